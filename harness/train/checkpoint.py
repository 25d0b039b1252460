"""Checkpoints of ``harness train`` with orbax-checkpoint: the training state on the device, the host's record of
the run (the monitor's statistics, the curves) and what identifies the run, so a killed run resumes from its last
checkpoint with nothing lost (the data order is a function of the step: the resumed run trains on the batches the
uninterrupted one would have).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from harness.errors import HarnessError


class Checkpoints:
    """``<output_dir>/checkpoints``, one orbax step directory per checkpoint, the last ``keep`` kept."""

    def __init__(self, output_dir: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = os.path.abspath(os.path.join(output_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, carry: Any, host: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]) -> None:
        """Asynchronous: orbax writes in the background while training goes on (:meth:`close` waits). ``host``:
        named groups of numpy arrays (orbax stores no empty array: those go into the metadata as their shapes)."""
        ocp = self.ocp
        arrays = {f"{group}.{k}": np.asarray(v) for group, values in host.items() for k, v in values.items()}
        empty = {k: [list(v.shape), v.dtype.str] for k, v in arrays.items() if v.size == 0}
        kept = {k: v for k, v in arrays.items() if v.size}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(carry), host=ocp.args.StandardSave(kept),
            meta=ocp.args.JsonSave({**meta, "empty_arrays": empty})))

    def meta(self, step: int) -> dict[str, Any]:
        """The checkpoint's metadata alone (what identifies its run), read before its arrays."""
        self.manager.wait_until_finished()
        try:
            return dict(self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore())).meta)
        except Exception as err:
            raise HarnessError(f"cannot read the checkpoint {self.directory}/{step}: {type(err).__name__}: {err} "
                               f"(train.resume=false starts afresh, or use another output_dir)", key="output_dir") from None

    def restore(self, step: int, abstract_carry: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        ocp = self.ocp
        self.manager.wait_until_finished()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_carry), host=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as err:  # a checkpoint of another model, or a half-written one
            raise HarnessError(f"cannot resume from {self.directory}/{step}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''} (train.resume=false starts afresh, "
                               f"or use another output_dir)", key="output_dir") from None
        meta = dict(restored.meta)
        arrays = {**{k: np.asarray(v) for k, v in dict(restored.host).items()},
                  **{k: np.zeros(shape, np.dtype(dtype)) for k, (shape, dtype) in meta.pop("empty_arrays", {}).items()}}
        host: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            group, name = k.split(".", 1)
            host.setdefault(group, {})[name] = v
        return restored.state, host, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
