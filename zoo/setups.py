"""The zoo's setups: planted bugs and healthy twins, each as the config groups a user would write.

A :class:`Setup` holds what a user's YAML files would hold (``model``, ``data``, ``loss``, ``optim``: a dict is a
config file the runner writes, ``_target_`` and keys; a string names a built-in option such as ``digits`` or
``adam``), extra command-line overrides, and what a correct tool says about it:

* ``expected``: finding ids any of which, at warning or error, counts as detecting the bug -- the cause's id and
  the symptoms its mechanism produces (:data:`harness.causes.EXPLAINS`);
* ``headline``: the ids acceptable as the report's ``first_to_fix`` -- the *cause*, never a symptom another
  finding explains (for unscaled inputs ``data.feature_scale``, not ``train.overfit_batch``).

Both are set from what the bug *is*, not from what harness reports today: the zoo measures the tool. Healthy
setups expect nothing: any error finding on them is a false alarm.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BUG, HEALTHY = "bug", "healthy"
FAMILIES = ("nnx", "linen", "equinox", "haiku")
CLASSIFICATION, REGRESSION, LANGUAGE_MODEL, PER_POSITION = ("classification", "regression", "language_model",
                                                            "per_position")
TASKS = (CLASSIFICATION, REGRESSION, LANGUAGE_MODEL, PER_POSITION)
GROUPS = ("model", "data", "loss", "optim")

Group = "dict[str, Any] | str"  # a config file's contents, or the name of a built-in option


@dataclasses.dataclass(frozen=True)
class Setup:
    name: str
    kind: str  # BUG or HEALTHY
    family: str  # nnx, linen, equinox, haiku
    task: str  # classification, regression, language_model, per_position
    description: str  # the bug as a user makes it (healthy: what the setup is)
    model: Any
    data: Any
    loss: Any = "auto"
    optim: Any = "adam"
    overrides: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()

    def groups(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "loss": self.loss, "optim": self.optim}

    def config_files(self) -> dict[str, dict[str, Any]]:
        """group -> the contents of ``<conf>/<group>/<name>.yaml`` for every group the setup writes itself."""
        return {g: dict(v) for g, v in self.groups().items() if isinstance(v, dict)}

    def group_choices(self) -> dict[str, str]:
        """group -> the option to pick on the command line: the setup's own file, or a built-in's name."""
        return {g: (self.name if isinstance(v, dict) else v) for g, v in self.groups().items()}

    def group_config(self, group: str) -> dict[str, Any]:
        """The group's config as harness composes it: the setup's own dict, or the built-in option's YAML file."""
        value = self.groups()[group]
        return dict(value) if isinstance(value, dict) else builtin_option(group, value)


def builtin_option(group: str, name: str) -> dict[str, Any]:
    """A built-in config group option (``harness/conf/<group>/<name>.yaml``) as a plain dict."""
    import os

    from omegaconf import OmegaConf

    from harness.config import config_dir

    path = os.path.join(config_dir(), group, f"{name}.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no built-in {group} option {name!r} ({path})")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.pop("defaults", None)
    return node


# ----------------------------------------------------------------------------------------------------------------
# Config helpers: what a user's YAML holds


def nnx(target: str = "zoo.models.MLP", **kw) -> dict:
    return {"_target_": target, "framework": "nnx", **kw}


def linen(target: str = "zoo.models.linen_mlp", **kw) -> dict:
    return {"_target_": target, "framework": "linen", **kw}


def equinox(target: str = "zoo.models.equinox_mlp", **kw) -> dict:
    return {"_target_": target, "framework": "equinox", **kw}


def haiku(target: str = "zoo.models.haiku_mlp", **kw) -> dict:
    return {"_target_": target, "framework": "haiku", **kw}


def data(target: str, **kw) -> dict:
    if "." not in target:
        target = f"zoo.data.{target}"
    return {"_target_": target, **kw}


def builtin_data(name: str, **kw) -> dict:
    return {"_target_": f"harness.data.builtin.{name}", **kw}


def loss(name: str, **kw) -> dict:
    return {"_target_": f"zoo.losses.{name}", "_partial_": True, **kw}


def optim(target: str, lr: float, **kw) -> dict:
    return {"_target_": f"optax.{target}", "lr": lr, **kw}


def bug(name, family, task, description, *, expected, headline, **groups) -> Setup:
    return Setup(name, BUG, family, task, description, expected=tuple(expected), headline=tuple(headline),
                 **groups)


def healthy(name, family, task, description, **groups) -> Setup:
    return Setup(name, HEALTHY, family, task, description, **groups)


# Symptoms of training that fails as configured (a subset of harness.causes.TRAINING_FAILURES a bug produces).
FAILS_TO_FIT = ("train.overfit_batch", "train.no_signal")
DIVERGES = ("train.divergence", "train.learning_rate", "train.overfit_batch", "train.no_signal")

LM_DATA = data("python_chars")
TAG_DATA = data("tagged_tokens")
DIGITS, WINE, BREAST_CANCER, REGRESSION_DATA = "digits", "wine", "breast_cancer", "regression"

# ----------------------------------------------------------------------------------------------------------------
# Planted bugs

DATA_BUGS = [
    bug("unscaled_inputs", "nnx", CLASSIFICATION,
        "breast-cancer features fed raw, scales from 0.001 to 4000 (standardize: false)",
        model="mlp", data=builtin_data("breast_cancer", standardize=False),
        expected=("data.feature_scale",) + FAILS_TO_FIT, headline=("data.feature_scale",)),
    bug("raw_pixels_linen", "linen", CLASSIFICATION,
        "8-bit digit images (0..255) never divided by 255",
        model=linen(), data=data("digits_raw_pixels"),
        expected=("data.feature_scale",) + FAILS_TO_FIT, headline=("data.feature_scale",)),
    bug("target_in_thousands", "nnx", REGRESSION,
        "regression targets left in dollars (mean 3000, std 1000), never standardized",
        model=nnx(), data=data("house_prices"),
        expected=("data.target_scale", "model.initial_loss") + DIVERGES, headline=("data.target_scale",)),
    bug("target_in_thousands_linen", "linen", REGRESSION,
        "the same unstandardized dollar targets with a Linen MLP",
        model=linen(), data=data("house_prices"),
        expected=("data.target_scale", "model.initial_loss") + DIVERGES, headline=("data.target_scale",)),
    bug("one_based_labels_haiku", "haiku", CLASSIFICATION,
        "labels numbered 1..10 and num_classes = 10 distinct labels: label 10 is out of range",
        model=haiku(), data=data("digits_one_based_labels"),
        expected=("data.label_range",), headline=("data.label_range",)),
    bug("shuffled_labels_haiku", "haiku", CLASSIFICATION,
        "rng.shuffle(y_train) meant to shuffle examples: labels no longer match inputs",
        model=haiku(), data=data("digits_shuffled_labels"),
        expected=("train.no_signal",), headline=("train.no_signal",)),
    bug("val_copied_from_train_equinox", "equinox", CLASSIFICATION,
        "x_val = x_train[:400]: validation is a slice of the training set",
        model=equinox(), data=data("digits_val_copied_from_train"),
        expected=("data.leakage",), headline=("data.leakage",)),
    bug("val_near_duplicates", "nnx", CLASSIFICATION,
        "validation = training rows plus 1e-3 noise (augmented copies of training data as validation)",
        model=nnx(), data=data("breast_cancer_val_near_duplicates"),
        expected=("data.leakage",), headline=("data.leakage",)),
    bug("split_sorted_by_class_linen", "linen", CLASSIFICATION,
        "data sorted by label and split without shuffling: classes 7-9 only in validation",
        model=linen(), data=data("digits_split_sorted_by_class"),
        expected=("data.label_distribution",), headline=("data.label_distribution",)),
    bug("nan_inputs_equinox", "equinox", CLASSIFICATION,
        "2% of the input values missing and left as NaN",
        model=equinox(), data=data("breast_cancer_missing_values"),
        expected=("data.nonfinite",), headline=("data.nonfinite",)),
    bug("conflicting_labels_haiku", "haiku", CLASSIFICATION,
        "two annotators' files concatenated: 30% of images twice, the second copy with another label",
        model=haiku(), data=data("digits_conflicting_labels"),
        expected=("data.conflicting_labels",), headline=("data.conflicting_labels",)),
    bug("labels_off_by_one_row_equinox", "equinox", CLASSIFICATION,
        "training labels misaligned by one row (np.roll by 1): each example has its neighbour's label",
        model=equinox(), data=data("wine_labels_off_by_one_row"),
        expected=("train.no_signal",), headline=("train.no_signal",)),
    bug("zeroed_features", "nnx", CLASSIFICATION,
        "quoted CSV numbers parse as NaN and np.nan_to_num turns every feature into 0",
        model=nnx(), data=data("quoted_csv_features"),
        expected=("data.constant_features",) + FAILS_TO_FIT, headline=("data.constant_features",)),
    bug("class_imbalance_linen", "linen", CLASSIFICATION,
        "50:1 class imbalance, neither reweighted nor resampled",
        model=linen(), data=data("imbalanced_blobs"),
        expected=("data.class_imbalance",), headline=("data.class_imbalance",)),
    bug("unseeded_split", "nnx", CLASSIFICATION,
        "the train/val split drawn with np.random.permutation and no seed: new data on every call",
        model=nnx(), data=data("unseeded_split"),
        expected=("data.nondeterministic", "train.nondeterministic"), headline=("data.nondeterministic",)),
    bug("nan_targets_haiku", "haiku", REGRESSION,
        "2% of the regression targets missing and left as NaN",
        model=haiku(), data=data("regression_missing_targets"),
        expected=("data.nonfinite",), headline=("data.nonfinite",)),
]

MODEL_BUGS = [
    bug("softmax_output", "nnx", CLASSIFICATION,
        "the model ends in a softmax and the loss is a cross-entropy on logits",
        model=nnx(output="softmax"), data=DIGITS,
        expected=("model.output_range",) + FAILS_TO_FIT, headline=("model.output_range",)),
    bug("softmax_output_linen", "linen", CLASSIFICATION,
        "nn.softmax after the last Dense, fed to a logits cross-entropy",
        model=linen(output="softmax"), data=DIGITS,
        expected=("model.output_range",) + FAILS_TO_FIT, headline=("model.output_range",)),
    bug("softmax_output_haiku", "haiku", CLASSIFICATION,
        "jax.nn.softmax after the last hk.Linear, fed to a logits cross-entropy",
        model=haiku(output="softmax"), data=WINE,
        expected=("model.output_range",) + FAILS_TO_FIT, headline=("model.output_range",)),
    # Zero-initialized ReLU layers output exactly 0 for every example (relu'(0) = 0): dead units and no gradient
    # flow are the same defect seen from the forward and the backward pass; either names the init as the cause.
    bug("zero_init", "nnx", CLASSIFICATION,
        "hidden layers initialized to zeros (kernel_init=zeros): every hidden unit identical and gradient-free",
        model=nnx(init="zeros"), data=DIGITS,
        expected=("model.gradient_flow", "model.dead_units") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.dead_units")),
    bug("zero_init_equinox", "equinox", CLASSIFICATION,
        "eqx.tree_at sets every hidden weight and bias to zero",
        model=equinox(init="zeros", bias=0.0), data=WINE,
        expected=("model.gradient_flow", "model.dead_units") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.dead_units")),
    bug("deep_relu_huge_init", "nnx", CLASSIFICATION,
        "20 ReLU layers drawn from N(0, 1) instead of He init: activations grow ~5.7x per layer",
        model=nnx(depth=20, init=1.0), data=DIGITS,
        expected=("model.exploding_activations", "model.initial_loss", "model.gradient_flow") + DIVERGES,
        headline=("model.exploding_activations",)),
    bug("deep_relu_huge_init_haiku", "haiku", CLASSIFICATION,
        "20 ReLU layers with w_init=RandomNormal(1.0)",
        model=haiku(depth=20, init=1.0), data=DIGITS,
        expected=("model.exploding_activations", "model.initial_loss", "model.gradient_flow") + DIVERGES,
        headline=("model.exploding_activations",)),
    # Depth times a gain below 1 per sigmoid layer: the signal vanishes forward (model.dead_units covers activations
    # whose spread vanishes across depth) as the gradient vanishes backward (model.gradient_flow). Either is the cause.
    bug("deep_sigmoid", "nnx", CLASSIFICATION,
        "20 sigmoid layers: gradients shrink ~4x per layer and vanish before the first",
        model=nnx(depth=20, activation="sigmoid", init="glorot_normal"), data=DIGITS,
        expected=("model.gradient_flow", "model.dead_units", "model.saturated_units") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.dead_units")),
    bug("deep_sigmoid_linen", "linen", CLASSIFICATION,
        "20 nn.sigmoid layers in Linen",
        model=linen(depth=20, activation="sigmoid", init="glorot_normal"), data=DIGITS,
        expected=("model.gradient_flow", "model.dead_units", "model.saturated_units") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.dead_units")),
    bug("saturated_tanh", "nnx", CLASSIFICATION,
        "tanh layers of 128 drawn from N(0, 1): pre-activations far in the flat region",
        model=nnx(width=128, activation="tanh", init=1.0), data=DIGITS,
        expected=("model.saturated_units", "model.gradient_flow") + FAILS_TO_FIT,
        headline=("model.saturated_units",)),
    bug("saturated_tanh_equinox", "equinox", CLASSIFICATION,
        "Equinox tanh MLP with N(0, 1) weights",
        model=equinox(width=128, activation="tanh", init=1.0), data=WINE,
        expected=("model.saturated_units", "model.gradient_flow") + FAILS_TO_FIT,
        headline=("model.saturated_units",)),
    bug("dead_relu", "nnx", CLASSIFICATION,
        "hidden ReLU biases initialized to -10: every unit off for every example",
        model=nnx(bias=-10.0), data=BREAST_CANCER,
        expected=("model.dead_units", "model.gradient_flow") + FAILS_TO_FIT, headline=("model.dead_units",)),
    bug("dead_relu_haiku", "haiku", CLASSIFICATION,
        "b_init=Constant(-10.0) on the hidden hk.Linear layers",
        model=haiku(bias=-10.0), data=DIGITS,
        expected=("model.dead_units", "model.gradient_flow") + FAILS_TO_FIT, headline=("model.dead_units",)),
    # A stop_gradient on a path the loss needs makes autodiff's gradient differ from the loss's true derivative:
    # model.gradient_check's definition, as model.gradient_flow (no gradient reaches the body) is.
    bug("frozen_body", "nnx", CLASSIFICATION,
        "jax.lax.stop_gradient on the features (a 'freeze the backbone' line left in): only the head trains",
        model=nnx(detach=True), data=DIGITS,
        expected=("model.gradient_flow", "model.gradient_check") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.gradient_check")),
    bug("frozen_body_linen", "linen", CLASSIFICATION,
        "stop_gradient before the Linen head",
        model=linen(detach=True), data=WINE,
        expected=("model.gradient_flow", "model.gradient_check") + FAILS_TO_FIT,
        headline=("model.gradient_flow", "model.gradient_check")),
    bug("batch_stats_at_eval", "nnx", CLASSIFICATION,
        "hand-written batch norm that always uses the current batch's statistics, at evaluation too",
        model=nnx(batch_norm=True), data=DIGITS,
        expected=("model.batch_dependence",), headline=("model.batch_dependence",)),
    bug("batch_stats_at_eval_haiku", "haiku", CLASSIFICATION,
        "the same hand-written batch norm inside a Haiku transform",
        model=haiku(batch_norm=True), data=WINE,
        expected=("model.batch_dependence",), headline=("model.batch_dependence",)),
    bug("wrong_custom_vjp", "nnx", CLASSIFICATION,
        "a custom_vjp swish whose backward pass forgets the product rule",
        model=nnx(activation="swish_wrong"), data=DIGITS,
        expected=("model.gradient_check",), headline=("model.gradient_check",)),
    bug("wrong_custom_vjp_equinox", "equinox", CLASSIFICATION,
        "the same wrong custom_vjp activation in an Equinox MLP",
        model=equinox(activation="swish_wrong"), data=BREAST_CANCER,
        expected=("model.gradient_check",), headline=("model.gradient_check",)),
    bug("wrong_custom_vjp_softplus_haiku", "haiku", CLASSIFICATION,
        "a custom_vjp softplus whose backward pass uses sigmoid(-x) instead of sigmoid(x)",
        model=haiku(activation="softplus_wrong"), data=WINE,
        expected=("model.gradient_check",), headline=("model.gradient_check",)),
    bug("head_missing_a_class", "nnx", CLASSIFICATION,
        "the output layer built with num_classes - 1 units",
        model=nnx(head_offset=-1), data=DIGITS,
        expected=("model.forward",), headline=("model.forward",)),
    bug("log_of_negative_output", "nnx", REGRESSION,
        "'log-scale predictions' as jnp.log of a linear output that can be negative: NaN",
        model=nnx(output="log"), data=data("positive_regression"),
        expected=("model.forward",), headline=("model.forward",)),
    bug("relu_on_regression_head_linen", "linen", REGRESSION,
        "a ReLU after the regression head: negative targets out of reach",
        model=linen(output="relu"), data=REGRESSION_DATA,
        expected=("model.output_range", "model.dead_units", "train.overfit_batch"),
        headline=("model.output_range", "model.dead_units")),
]

SEQUENCE_BUGS = [
    bug("lm_no_causal_mask", "nnx", LANGUAGE_MODEL,
        "a causal transformer LM with mask=None: each position reads the token it predicts",
        model=nnx("zoo.models.Transformer", mask="none"), data=LM_DATA,
        expected=("model.causal_leakage",), headline=("model.causal_leakage",)),
    bug("lm_mask_off_by_one", "nnx", LANGUAGE_MODEL,
        "causal mask built as jnp.tril(ones, k=1): each position also sees the next token",
        model=nnx("zoo.models.Transformer", mask="causal_k1"), data=LM_DATA,
        expected=("model.causal_leakage",), headline=("model.causal_leakage",)),
    bug("lm_no_causal_mask_linen", "linen", LANGUAGE_MODEL,
        "nn.MultiHeadDotProductAttention called without nn.make_causal_mask",
        model=linen("zoo.models.linen_transformer", mask="none"), data=LM_DATA,
        expected=("model.causal_leakage",), headline=("model.causal_leakage",)),
    bug("lm_no_causal_mask_equinox", "equinox", LANGUAGE_MODEL,
        "eqx.nn.MultiheadAttention called with mask=None in a language model",
        model=equinox("zoo.models.equinox_transformer", mask="none"), data=LM_DATA,
        expected=("model.causal_leakage",), headline=("model.causal_leakage",)),
    bug("lm_mask_transposed_haiku", "haiku", LANGUAGE_MODEL,
        "causal mask built with jnp.triu instead of jnp.tril: each position sees only the future",
        model=haiku("zoo.models.haiku_transformer", mask="triu"), data=LM_DATA,
        expected=("model.causal_leakage",), headline=("model.causal_leakage",)),
    bug("tagger_attends_to_padding", "nnx", PER_POSITION,
        "a bidirectional tagger of right-padded sequences without a padding mask: outputs read the padding",
        model=nnx("zoo.models.Transformer", mask="none", vocab_size=20), data=TAG_DATA,
        expected=("model.padding_leakage",), headline=("model.padding_leakage",)),
    bug("tagger_channels_first_equinox", "equinox", PER_POSITION,
        "the tagger returns (num_classes, T) per sequence (a Conv1d habit) instead of (T, num_classes)",
        model=equinox("zoo.models.equinox_tagger", channels_first=True), data=TAG_DATA,
        expected=("model.forward",), headline=("model.forward",)),
]

LOSS_BUGS = [
    bug("sign_flipped_loss", "nnx", CLASSIFICATION,
        "the user's loss returns the log-likelihood (minus sign forgotten)",
        model=nnx(), data=DIGITS, loss=loss("log_likelihood"),
        expected=("train.loss_increasing", "train.divergence", "model.initial_loss") + FAILS_TO_FIT,
        headline=("train.loss_increasing",)),
    bug("sign_flipped_loss_equinox", "equinox", CLASSIFICATION,
        "the same sign-flipped loss with an Equinox model",
        model=equinox(), data=WINE, loss=loss("log_likelihood"),
        expected=("train.loss_increasing", "train.divergence", "model.initial_loss") + FAILS_TO_FIT,
        headline=("train.loss_increasing",)),
    bug("summed_loss_sgd", "nnx", CLASSIFICATION,
        "the loss sums over the batch (reduction='sum') with an SGD learning rate chosen for a mean",
        model=nnx(), data=DIGITS, loss=loss("summed_cross_entropy"), optim=optim("sgd", 0.1, momentum=0.9),
        expected=("model.forward",) + DIVERGES,
        headline=("model.forward", "train.divergence", "train.learning_rate")),
    bug("broadcast_loss", "nnx", REGRESSION,
        "squared error of (N, 1) outputs against (N,) targets: a (N, N) loss",
        model=nnx(), data=REGRESSION_DATA, loss=loss("broadcast_square_error"),
        expected=("model.forward",), headline=("model.forward",)),
    bug("broadcast_mse_haiku", "haiku", REGRESSION,
        "the same broadcast reduced with .mean(axis=-1): shape (N,), every output scored against every target",
        model=haiku(), data=REGRESSION_DATA, loss=loss("broadcast_mse"),
        expected=("model.forward", "model.batch_dependence") + FAILS_TO_FIT,
        headline=("model.forward", "model.batch_dependence")),
    # No finding id names a wrong loss; the overfit test is the check that asks whether the loss can be driven down,
    # so it counts as naming the cause here, as model.output_range (probabilities into a logits loss) does.
    bug("softmax_in_loss_linen", "linen", CLASSIFICATION,
        "the loss softmaxes the logits and hands the probabilities to a logits cross-entropy",
        model=linen(), data=DIGITS, loss=loss("cross_entropy_of_probabilities"),
        expected=("model.output_range",) + FAILS_TO_FIT, headline=("model.output_range", "train.overfit_batch")),
    bug("naive_bce_linen", "linen", CLASSIFICATION,
        "binary cross-entropy written as -(y log p + (1-y) log(1-p)): NaN once p rounds to 1",
        model=linen(), data=BREAST_CANCER, loss=loss("naive_binary_cross_entropy"),
        expected=("train.divergence", "train.loss_increasing", "model.forward") + FAILS_TO_FIT,
        headline=("train.divergence", "model.forward")),
]

OPTIM_BUGS = [
    bug("adam_lr_3", "nnx", CLASSIFICATION,
        "Adam with lr=3 (a learning rate meant for SGD on another problem)",
        model="mlp", data=DIGITS, optim=optim("adam", 3.0),
        expected=DIVERGES, headline=("train.divergence", "train.learning_rate")),
    bug("adam_lr_1e-7_equinox", "equinox", CLASSIFICATION,
        "Adam with lr=1e-7: nothing moves within any budget",
        model=equinox(), data=DIGITS, optim=optim("adam", 1e-7),
        expected=("train.learning_rate",) + FAILS_TO_FIT, headline=("train.learning_rate",)),
    bug("sgd_lr_10_haiku", "haiku", CLASSIFICATION,
        "SGD with momentum at lr=10",
        model=haiku(), data=DIGITS, optim=optim("sgd", 10.0, momentum=0.9),
        expected=DIVERGES, headline=("train.divergence", "train.learning_rate")),
    bug("clip_1e-6_linen", "linen", CLASSIFICATION,
        "gradient clipping at a global norm of 1e-6 (meant 1.0): SGD steps of norm at most 1e-7",
        model=linen(), data=DIGITS, optim=optim("sgd", 0.01, momentum=0.9, clip_norm=1e-6),
        expected=("train.learning_rate",) + FAILS_TO_FIT, headline=("train.learning_rate",)),
]

# ----------------------------------------------------------------------------------------------------------------
# Healthy setups: none of them may get an error finding

HEALTHY_SETUPS = [
    healthy("reference", "nnx", CLASSIFICATION, "the reference job: built-in MLP 64-128-128-10 on digits, Adam",
            model="mlp", data=DIGITS),
    healthy("wine_mlp", "nnx", CLASSIFICATION, "the built-in MLP on standardized wine",
            model="mlp", data=WINE),
    healthy("logistic_regression", "nnx", CLASSIFICATION,
            "logistic regression on standardized breast cancer (a small model on purpose)",
            model=nnx("zoo.models.Linear"), data=BREAST_CANCER),
    healthy("linear_regression_user_mse", "nnx", REGRESSION,
            "linear regression on noisy linear targets with the user's own squared error",
            model=nnx("zoo.models.Linear"), data=data("noisy_linear"), loss=loss("mse")),
    healthy("xor_two_tanh_units", "nnx", CLASSIFICATION,
            "two tanh hidden units on noisy XOR with 10% flipped labels",
            model=nnx(width=2, depth=1, activation="tanh", init="glorot_normal"), data=data("noisy_xor"),
            optim=optim("adam", 1e-2)),
    healthy("digits_four_units", "nnx", CLASSIFICATION, "a 4-unit MLP classifier on digits (small on purpose)",
            model=nnx("harness.models.mlp.MLP", width=4, depth=1), data=DIGITS),
    healthy("softmax_regression_zero_init", "nnx", CLASSIFICATION,
            "softmax regression initialized to zeros (no hidden units: nothing to keep symmetric)",
            model=nnx("zoo.models.Linear", init="zeros"), data=DIGITS),
    healthy("swish_custom_vjp", "nnx", CLASSIFICATION,
            "an MLP with a correct hand-written custom_vjp swish (the twin of wrong_custom_vjp)",
            model=nnx(activation="swish"), data=DIGITS),
    healthy("deep_relu_he", "nnx", CLASSIFICATION, "a 20-layer ReLU MLP with He init (the twin of the huge init)",
            model=nnx(depth=20, init="he_normal"), data=DIGITS),
    healthy("linen_user_cross_entropy", "linen", CLASSIFICATION,
            "a Linen MLP on digits with the user's own cross-entropy",
            model=linen(), data=DIGITS, loss=loss("cross_entropy")),
    healthy("linen_tanh_wine", "linen", CLASSIFICATION, "a Linen tanh MLP with Glorot init on wine",
            model=linen(activation="tanh", init="glorot_normal"), data=WINE),
    healthy("equinox_wine", "equinox", CLASSIFICATION, "an Equinox MLP (Equinox's own init) on wine",
            model=equinox(), data=WINE),
    healthy("equinox_user_ce_breast_cancer", "equinox", CLASSIFICATION,
            "an Equinox MLP on breast cancer with the user's own cross-entropy",
            model=equinox(), data=BREAST_CANCER, loss=loss("cross_entropy")),
    healthy("haiku_regression", "haiku", REGRESSION, "a Haiku MLP on harness's generated regression",
            model=haiku(), data=REGRESSION_DATA),
    healthy("haiku_dropout_digits", "haiku", CLASSIFICATION, "a Haiku MLP with dropout 0.2 on digits",
            model=haiku(dropout=0.2), data=DIGITS),
    healthy("lm_causal", "nnx", LANGUAGE_MODEL,
            "a tiny causal transformer LM (width 32, 32 characters, vocabulary 32) on Python's own sources",
            model=nnx("zoo.models.Transformer", mask="causal"), data=LM_DATA, optim=optim("adam", 3e-3)),
    healthy("tagger_padding_mask", "nnx", PER_POSITION,
            "a bidirectional tagger of padded sequences with its padding mask",
            model=nnx("zoo.models.Transformer", mask="padding", vocab_size=20), data=TAG_DATA,
            optim=optim("adam", 3e-3)),
]

BUGS = DATA_BUGS + MODEL_BUGS + SEQUENCE_BUGS + LOSS_BUGS + OPTIM_BUGS
SETUPS: tuple[Setup, ...] = tuple(BUGS + HEALTHY_SETUPS)


def by_name() -> dict[str, Setup]:
    return {s.name: s for s in SETUPS}


def select(only: str | list[str] | None = None, kind: str | None = None) -> list[Setup]:
    """Setups by name (comma-separated or a list, in the given order) and/or kind; unknown names raise."""
    chosen = list(SETUPS)
    if only:
        names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
        table = by_name()
        unknown = [n for n in names if n not in table]
        if unknown:
            raise KeyError(f"unknown setup(s): {', '.join(unknown)}")
        chosen = [table[n] for n in names]
    if kind:
        if kind not in (BUG, HEALTHY):
            raise ValueError(f"kind must be {BUG} or {HEALTHY}, got {kind!r}")
        chosen = [s for s in chosen if s.kind == kind]
    return chosen
