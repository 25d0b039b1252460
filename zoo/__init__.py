"""The planted-bug zoo: setups a user could write, each with one realistic mistake (or none), that measure harness.

Separate from the unit tests: ``scripts/zoo.py`` runs every setup of :mod:`zoo.setups` through the real CLI, as a
user's own config groups (``_target_`` pointing at the factories here or at harness's built-ins), and scores the
reports: the detection rate (bugs whose expected finding is reported), the right-headline rate (bugs whose
``first_to_fix`` is the cause) and the false-alarm rate (healthy setups with an error finding).

* :mod:`zoo.data` -- data factories: clean pipelines and pipelines with one mistake each;
* :mod:`zoo.models` -- model factories in Flax NNX, Flax Linen, Equinox and Haiku;
* :mod:`zoo.losses` -- losses as users write them, correct and wrong;
* :mod:`zoo.setups` -- the list of setups, each with what it expects harness to say.

The expectations describe what the bug *is*, never what harness happens to report today.
"""
