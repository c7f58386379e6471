"""The experiment presets: what each experiment runs, and the paper claims it tests.

A :class:`Preset` is one experiment: the paper claim(s) it tests, its conditions (a model
factory and optimizer settings each, :class:`Condition`), data, steps, seeds, batch size,
evaluation and what to record. :data:`PRESETS` holds them by name (``icstools list`` prints
them; :func:`get_preset` looks one up) and :func:`~icstools.experiments.runner.run_preset` runs
one. Each preset is a small function below (``_fig1``, ``_lr_sweep``, …) whose docstring becomes
the preset's ``notes``: the set-up's choices and figures measured with it.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from icstools.experiments.measures import _MEASURES
from icstools.experiments.models import paper_mlp, small_cnn, vgg_cnn

__all__ = [
    "CNN_LR",
    "DATA_SHAPES",
    "FIG1_LR",
    "LANDSCAPE_CNN_LR",
    "PRESETS",
    "RELU_LR",
    "Condition",
    "Preset",
    "PresetError",
    "get_preset",
]

#: Shape of one example for each ``data`` value of :func:`train` and :class:`Preset`.
DATA_SHAPES: dict[str, tuple[int, ...]] = {"mnist": (784,), "mnist-image": (1, 28, 28)}


class PresetError(ValueError):
    """An unknown preset, or run arguments a preset cannot run with (the message says which)."""


def _jsonable(value: Any) -> Any:
    """JSON-able copy: tuples → lists, non-finite floats → None, types/callables → names."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, type(None), str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _factory_target(factory: Callable[..., nn.Module]) -> str:
    """``package.module:factory`` of a model factory (a :func:`load_factory` target), for the
    manifest. The factories of this package are named by the path users import them from,
    ``icstools.experiments:<name>``, not by the module that defines them."""
    module, name = factory.__module__, factory.__qualname__
    if module.startswith(f"{__package__}."):
        import icstools.experiments as package

        if getattr(package, name, None) is factory:
            module = __package__
    return f"{module}:{name}"


@dataclass(frozen=True)
class Condition:
    """One arm of an experiment: a model factory and its optimizer settings.

    Attributes
    ----------
    name : str
        Folder name of its runs (``<out>/<preset>/<name>/seed-<n>.zarr``).
    factory : callable
        Builds the model: ``factory(**kwargs)``, called after ``torch.manual_seed(seed)``.
    kwargs : mapping
        Keyword arguments of ``factory`` (JSON-able: they go into the manifest).
    lr : float
        Learning rate.
    optimizer : {"sgd", "adam"}
    momentum, weight_decay : float
    steps : int, optional
        Steps of this condition when fewer than the preset's (e.g. 1: a measurement at
        initialization).
    record : mapping
        Recorder options overriding the preset's for this condition.
    description : str
        One line.
    """

    name: str
    factory: Callable[..., nn.Module]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    lr: float = 0.5
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    steps: int | None = None
    record: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self) -> nn.Module:
        """The model, freshly initialized from the global torch RNG."""
        return self.factory(**self.kwargs)

    def settings(self) -> dict[str, Any]:
        """JSON-able description (for the manifest)."""
        return {
            "description": self.description,
            "model": _factory_target(self.factory),
            "kwargs": _jsonable(dict(self.kwargs)),
            "optimizer": self.optimizer,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "steps": self.steps,
            "record": _jsonable(dict(self.record)),
        }


@dataclass(frozen=True)
class Preset:
    """One experiment: the claim(s) it tests, its conditions, data, schedule and recording.

    Attributes
    ----------
    name : str
        Name on the command line (``icstools run <name>``).
    description : str
        One line (``icstools list``).
    claims : tuple of str
        The paper claims the experiment tests, with their source.
    conditions : tuple of Condition
        The arms.
    steps : int
        Optimizer steps per run (full scale).
    seeds : tuple of int
        Seeds (one run per condition and seed); 5 by default, enough for the t intervals of
        the verdicts to have 4–8 degrees of freedom (``fig1``: 10).
    batch_size : int
        Mini-batch size.
    data : {"mnist", "mnist-image"}
        Flattened (MLPs) or ``[1, 28, 28]`` (CNNs) MNIST.
    records : int
        Evenly spaced records per run (plus early and last ones: :func:`record_steps`).
    eval_every : int
        Test accuracy at every ``eval_every``-th record (always the first and the last).
    eval_size : int, optional
        Test images used for accuracy during training (``None``: all 10,000).
    probe_size : int
        Probe batch: the first ``probe_size`` test images.
    record : mapping
        Further :class:`~icstools.Recorder` options (``sites``, ``role``, ``probe_sample``,
        ``gradients``, ``jacobian_examples``, …).
    ics_every, landscape_every, jacobian_every : int, optional
        Gradient-based ICS, landscape probes, Jacobian spectra at every k-th record (with the
        cross-entropy loss); ``None``: not measured.
    measure : str, optional
        A measurement logged into the run (``"scale_invariance"``: :func:`scale_invariance`),
        at every ``measure_every``-th record.
    measure_every : int
    measure_kwargs : mapping
        Keyword arguments of the measurement (e.g. ``{"test_size": 1000}``).
    quick_steps : int
        Steps of ``quick=True`` runs (with one seed).
    quick_records : int
        ``records`` of ``quick=True`` runs (when fewer than ``records``).
    quick_record : mapping
        Recorder options overriding the others in ``quick=True`` runs (e.g. fewer Jacobian
        examples).
    quick_measure_kwargs : mapping
        ``measure_kwargs`` overriding the others in ``quick=True`` runs (e.g. fewer images).
    notes : str
        Longer documentation: the set-up's choices and figures measured with it.
    """

    name: str
    description: str
    claims: tuple[str, ...]
    conditions: tuple[Condition, ...]
    steps: int
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    batch_size: int = 60
    data: str = "mnist"
    records: int = 100
    eval_every: int = 1
    eval_size: int | None = None
    probe_size: int = 1000
    record: Mapping[str, Any] = field(default_factory=dict)
    ics_every: int | None = None
    landscape_every: int | None = None
    jacobian_every: int | None = None
    measure: str | None = None
    measure_every: int = 1
    measure_kwargs: Mapping[str, Any] = field(default_factory=dict)
    quick_steps: int = 300
    quick_records: int = 10
    quick_record: Mapping[str, Any] = field(default_factory=dict)
    quick_measure_kwargs: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        names = [c.name for c in self.conditions]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"preset {self.name!r} needs conditions with distinct names: {names}")
        if self.data not in DATA_SHAPES:
            raise ValueError(f"data must be one of {sorted(DATA_SHAPES)}, got {self.data!r}")
        if self.measure is not None and self.measure not in _MEASURES:
            raise ValueError(f"measure must be one of {sorted(_MEASURES)}, got {self.measure!r}")

    def condition(self, name: str) -> Condition:
        """The condition called ``name``."""
        for c in self.conditions:
            if c.name == name:
                return c
        raise PresetError(
            f"preset {self.name!r} has no condition {name!r}; conditions: "
            f"{[c.name for c in self.conditions]}"
        )

    def recorder_options(self, condition: Condition, *, quick: bool = False) -> dict[str, Any]:
        """The Recorder options of ``condition``'s runs besides schedules, probe and path."""
        return {**self.record, **condition.record, **(self.quick_record if quick else {})}

    def settings(self) -> dict[str, Any]:
        """JSON-able description of what is recorded and evaluated (for the manifest)."""
        return {
            "records": self.records,
            "schedule": "record_steps(steps, records): evenly spaced + early (1, 2, 5, …) + last",
            "eval": {"every_records": self.eval_every, "eval_size": self.eval_size},
            "probe_size": self.probe_size,
            "recorder": _jsonable(dict(self.record)),
            "ics_every_records": self.ics_every,
            "landscape_every_records": self.landscape_every,
            "jacobian_every_records": self.jacobian_every,
            "measure": self.measure,
            "measure_every_records": self.measure_every,
            "measure_kwargs": _jsonable(dict(self.measure_kwargs)),
        }


#: The presets by name, in the order of :func:`preset_names`.
PRESETS: dict[str, Preset] = {}


def _preset(build: Callable[[], Preset]) -> Callable[[], Preset]:
    """Register the preset a function builds; its docstring becomes the preset's notes."""
    preset = build()
    if preset.name in PRESETS:
        raise ValueError(f"duplicate preset {preset.name!r}")
    PRESETS[preset.name] = dataclasses.replace(preset, notes=_dedent(build.__doc__ or ""))
    return build


def _dedent(text: str) -> str:
    lines = text.strip("\n").splitlines()
    return (lines[0].strip() + "\n" + textwrap.dedent("\n".join(lines[1:]))).strip()


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises
    ------
    PresetError
        Unknown name; the message lists the valid ones.

    Examples
    --------
    >>> get_preset("fig1").steps
    50000
    """
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a preset name must be a string, got {type(name).__name__}")
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


#: The SGD learning rate of the §4.1 network, chosen with :func:`fig1_lr_sweep` (see ``fig1``).
FIG1_LR = 1.0

_CLAIM_41_ACC = (
    "Ioffe & Szegedy 2015 §4.1, Fig. 1(a): the batch-normalized network reaches a higher test "
    "accuracy, and faster."
)
_CLAIM_41_ICS = (
    "Ioffe & Szegedy 2015 §4.1, Fig. 1(b, c): with BN the distribution of the sigmoid inputs "
    "is much more stable during training (less internal covariate shift)."
)
_CLAIM_LR = (
    "Ioffe & Szegedy 2015 §3.3, §4.2.2: BN allows much higher learning rates (×5, ×30) without "
    "divergence; the same increase without BN drives the parameters to machine infinity."
)
_CLAIM_SAT = (
    "Ioffe & Szegedy 2015 §3.3, §4.2.2: BN prevents training from getting stuck in the saturated "
    "regimes of nonlinearities, making deep sigmoid networks trainable."
)
_CLAIM_SCALE = (
    "Ioffe & Szegedy 2015 §3.3: with BN, back-propagation through a layer is invariant to the "
    "scale of its weights (BN((aW)u) = BN(Wu), ∂ℓ/∂u unchanged, ∂ℓ/∂(aW) = ∂ℓ/∂W / a), larger "
    "weights get smaller gradients, and BN stabilizes parameter growth."
)
_CLAIM_JAC = (
    "Ioffe & Szegedy 2015 §3.3 (conjecture): BN keeps the singular values of the layer "
    "Jacobians close to 1."
)
_CLAIM_YANG = (
    "Yang et al. 2019: at initialization, gradients explode with depth in batch-normalized "
    "fully connected networks."
)
_CLAIM_NOISY = (
    "Santurkar et al. 2018 §2: BN's benefit does not come from reducing ICS: a network with "
    "noisy BN (a time-varying distribution shift injected after each BN) trains about as well "
    "as with BN, though its layer inputs are far less stable."
)
_CLAIM_SANT_ICS = (
    "Santurkar et al. 2018 §2.2: measured through gradients (Def. 2.1), BN does not reduce ICS."
)
_CLAIM_SANT_SMOOTH = (
    "Santurkar et al. 2018 §3: BN makes the loss landscape smoother (smaller loss variation, "
    "more predictive gradients, lower effective β-smoothness)."
)
_CLAIM_REG = (
    "Ioffe & Szegedy 2015 §3.4, §4.2.1: BN regularizes the model and reduces the need for "
    "Dropout: a batch-normalized network generalizes well without it (a smaller gap between "
    "training and test)."
)
_CLAIM_SANT_VGG = (
    "Santurkar et al. 2018 §3, Fig. 4 (VGG): along training, BN makes the loss landscape "
    "smoother: smaller variation of the loss along the gradient, more predictive gradients "
    "(smaller change of the gradient along it), lower effective β-smoothness."
)
_CLAIM_CNN = (
    "Ioffe & Szegedy 2015 §3.2: in convolutional layers BN normalizes per feature map (over the "
    "batch and all locations), and brings the same benefits as in fully connected ones."
)


def _mlp(name: str, lr: float, description: str, **kwargs: Any) -> Condition:
    return Condition(name, paper_mlp, kwargs, lr=lr, description=description)


@_preset
def _fig1() -> Preset:
    """Paper §4.1, Fig. 1: the 784-100-100-100-10 sigmoid MLP on MNIST, with and without BN.

    Set-up: weights ~ N(0, 0.1²), biases 0 (BN network: no hidden biases), plain SGD, batches
    of 60, 50,000 steps, 10 seeds (the accuracy claims' differences are a few tenths of a
    percent: 3 seeds left them inconclusive). Recorded: the inputs of the three sigmoids (the
    paper's Fig. 1(b, c) sites) on the training batch and on a fixed probe of the first 1,000 test
    images, with all 1,000 probe values per unit kept (``probe_sample``) so that W1 and the
    other sample-based drift metrics are exact; activation gradients and parameter dynamics
    (``gradients=True``); test accuracy (all 10,000 images) at every record.

    Learning rate. The paper gives neither the learning rate nor the initialization scale. The
    rate was chosen with ``fig1_lr_sweep(lrs=(0.1, 0.3, 1, 3), steps=5000, seeds=(0,))``,
    run on 2 shared CPU cores with 1 torch thread (2026-11-23); final test accuracy (all
    10,000 test images) after 5,000 steps, seed 0 (seed 1 in parentheses):

    ======  ===============  ===============
    lr      baseline         BN
    ======  ===============  ===============
    0.1     0.9117           0.9552
    0.3     0.9555           0.9643
    1       0.9707 (0.9682)  0.9666 (0.9725)
    3       0.9689 (0.9682)  0.9698 (0.9747)
    ======  ===============  ===============

    No run diverged. The baseline's best rate is 1.0 (3.0 ties on seed 1), and it is used for
    both networks (``FIG1_LR``): the paper compares the two networks in one set-up, and the
    baseline is the one whose rate §4.2.2's multipliers refer to. At 3,000 steps (seed 0) the
    baseline reaches 0.9628 at lr 5 and stays at chance (0.1135) at lr 30; BN reaches 0.9610
    and 0.9292 (see ``lr-sweep``).
    """
    return Preset(
        name="fig1",
        description="§4.1 Fig. 1: sigmoid MLP on MNIST, BN vs none; sigmoid inputs over 50k steps",
        claims=(_CLAIM_41_ACC, _CLAIM_41_ICS),
        conditions=(
            _mlp("baseline", FIG1_LR, "784-100-100-100-10 sigmoid MLP, no BN", bn=False),
            _mlp("bn", FIG1_LR, "the same with BN before each sigmoid (no hidden bias)", bn=True),
        ),
        steps=50_000,
        seeds=tuple(range(10)),
        records=100,
        record={"probe_sample": 1000, "gradients": True},
    )


#: SGD learning rate of the ReLU variant of the §4.1 network in ``lr-sweep``: the best of
#: (0.03, 0.1, 0.3, 0.5) for the no-BN network after 2,000 steps (seed 0: 0.9368, 0.9604, 0.9647,
#: 0.9640; BN: 0.9546, 0.9703, 0.9718, 0.9726).
RELU_LR = 0.3


@_preset
def _lr_sweep() -> Preset:
    """Paper §4.2.2's learning-rate multipliers ×1, ×5, ×30 on the §4.1 network, with ReLU too.

    Two families, each at ×1, ×5 and ×30 of its no-BN network's best rate, with and without BN
    (12 conditions), 10,000 steps, 5 seeds:

    * ``baseline-x<m>``, ``bn-x<m>``: the §4.1 sigmoid network, base rate ``FIG1_LR`` (1.0);
    * ``relu-baseline-x<m>``, ``relu-bn-x<m>``: the same with ReLU (the nonlinearity of the
      paper's Inception runs, where the ×5 rate without BN "caused the model parameters to
      reach machine infinity"), base rate ``RELU_LR`` (0.3).

    Found while choosing the rates (2,000–3,000 steps, seed 0): a sigmoid network cannot reach
    machine infinity (its activations are bounded, so are its gradients), and without BN at ×30
    it stays at chance accuracy instead; the ReLU network without BN diverges at ×5 (non-finite
    loss at step 15) and is dead at ×30 (0.098); with BN the ReLU network trains at ×5
    (0.9721) but not at ×30 (0.098). Whether a run is stuck shows in its accuracy.

    A run whose loss becomes non-finite goes on to the next recorded step, stops there and is
    reported as diverged (its store has ``diverged_step``): that is a result, not an error.
    Recorded: the nonlinearities' inputs (train and probe), activation gradients and parameter
    norms (weight growth at high rates), test accuracy at every record.
    """
    conds = []
    for act, base in (("sigmoid", FIG1_LR), ("relu", RELU_LR)):
        for bn in (False, True):
            for mult in (1, 5, 30):
                prefix = "" if act == "sigmoid" else f"{act}-"
                label = f"{prefix}{'bn' if bn else 'baseline'}-x{mult}"
                desc = f"{'BN' if bn else 'no-BN'} {act} MLP at lr {base * mult:g} (×{mult})"
                conds.append(_mlp(label, base * mult, desc, bn=bn, activation=act))
    return Preset(
        name="lr-sweep",
        description="§4.2.2 on MNIST: lr ×1, ×5, ×30 with and without BN; divergence as a result",
        claims=(_CLAIM_LR,),
        conditions=tuple(conds),
        steps=10_000,
        records=50,
        record={"gradients": True},
    )


@_preset
def _saturating() -> Preset:
    """Deep saturating networks: 8 hidden layers of 100, sigmoid or tanh, with and without BN.

    Same initialization (N(0, 0.1²)) and lr (``FIG1_LR``) as ``fig1``, 20,000 steps, 5 seeds.
    Whether each network trains or stays stuck shows in the test accuracy; ``sat_frac`` (share
    of sigmoid/tanh inputs where the derivative is below 0.01) per unit over time,
    and the activation-gradient norms per layer (``gradients=True``) show why.

    Checked while setting it up (seed 0, test accuracy at steps 1,000 / 2,000 / 3,000): sigmoid
    0.098 / 0.114 / 0.114 and tanh 0.089 / 0.103 / 0.114 without BN (stuck at chance), with BN
    0.923 / 0.949 / 0.951 and 0.938 / 0.964 / 0.964.
    """
    widths = (100,) * 8
    conds = []
    for act in ("sigmoid", "tanh"):
        for bn in (False, True):
            conds.append(
                _mlp(
                    f"{act}{'-bn' if bn else ''}",
                    FIG1_LR,
                    f"784-8×100-10 {act} MLP {'with' if bn else 'without'} BN",
                    bn=bn,
                    widths=widths,
                    activation=act,
                )
            )
    return Preset(
        name="saturating",
        description="8-layer sigmoid and tanh MLPs, BN vs none: trainable or stuck, sat_frac",
        claims=(_CLAIM_SAT,),
        conditions=tuple(conds),
        steps=20_000,
        records=50,
        record={"gradients": True},
    )


@_preset
def _scale_invariance() -> Preset:
    """§3.3 measured during training, on the §4.1 network.

    Conditions: BN at ``FIG1_LR`` and at 5× it, and the no-BN network at ``FIG1_LR`` as the
    control for parameter growth; 20,000 steps, 5 seeds. At every 5th record the BN layers'
    identities are checked on the step's batch with ``scale_invariance`` (scales 0.1, 10, 1000;
    float32, as training computes): ``si_output``, ``si_input_grad``, ``si_weight_grad`` (worst
    relative error over layers and scales) and ``si_eps_effect`` (the part BN's ε explains),
    plus per layer ``si_<identity>_<layer>``. ``gradients=True`` records the parameter norms
    and ``eff_lr`` = lr/‖W‖² of the normalized weights, the effective step size under scale
    invariance.
    """
    return Preset(
        name="scale-invariance",
        description="§3.3 during training: BN's weight-scale invariance, parameter growth, eff_lr",
        claims=(_CLAIM_SCALE,),
        conditions=(
            _mlp("bn", FIG1_LR, "BN sigmoid MLP", bn=True),
            _mlp("bn-x5", 5 * FIG1_LR, "BN sigmoid MLP at 5× the lr", bn=True),
            _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP (parameter growth control)", bn=False),
        ),
        steps=20_000,
        records=50,
        record={"gradients": True},
        measure="scale_invariance",
        measure_every=5,
    )


@_preset
def _jacobian() -> Preset:
    """Jacobian spectra: §3.3's conjecture during training, and Yang et al. 2019 at init.

    Training: the §4.1 network with and without BN, 10,000 steps, 5 seeds; at every 5th record
    the singular values of the per-example Jacobians (64 probe examples) of each segment between
    consecutive sigmoid inputs and of the whole network (``jac_sv``, ``jac_*`` summaries), BN's
    batch statistics held fixed (the linearization §3.3 argues about).

    Initialization: sigmoid MLPs of 2, 4, 8 and 16 hidden layers of 100, with and without BN,
    one step each: the record of step 0 holds the spectra of the untrained network (BN: the
    ``full`` per-example Jacobian, batch statistics' dependence included, as back-propagation
    sees it) and the activation-gradient norms per layer (``grad_norm``), whose growth towards
    the input is Yang et al.'s gradient explosion.
    """
    conds = [
        _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP, trained", bn=False),
        _mlp("bn", FIG1_LR, "BN sigmoid MLP, trained", bn=True),
    ]
    for bn in (True, False):
        for depth in (2, 4, 8, 16):
            label = "bn" if bn else "baseline"
            conds.append(
                Condition(
                    f"init-{label}-depth{depth}",
                    paper_mlp,
                    {"bn": bn, "widths": (100,) * depth},
                    lr=FIG1_LR,
                    steps=1,
                    record={"jacobian_bn": "full"} if bn else {},
                    description=f"{depth} hidden layers, {'BN' if bn else 'no BN'}, at init",
                )
            )
    return Preset(
        name="jacobian",
        description="Jacobian spectra: BN vs none over training, and BN nets at init by depth",
        claims=(_CLAIM_JAC, _CLAIM_YANG),
        conditions=tuple(conds),
        steps=10_000,
        records=50,
        jacobian_every=5,
        record={"gradients": True, "jacobian_examples": 64},
        quick_record={"jacobian_examples": 16},
    )


@_preset
def _noisy_bn() -> Preset:
    """Santurkar et al. 2018 §2–3 on the §4.1 network: BN, noisy BN, no BN.

    Noisy BN is ``NoisyBatchNorm1d`` (a ← s·a + m after each BN; per unit and step
    μ ~ U(−0.5, 0.5), σ ~ U(1, 1.25); per activation m ~ U(μ ± 0.1), s ~ N(σ, 0.1²)).
    20,000 steps, 5 seeds (noisy BN alone, seed 0: test accuracy 0.932, 0.953, 0.963 after
    1,000, 2,000, 3,000 steps). Recorded: sigmoid inputs (train and probe, 1,000 probe values per
    unit for exact drift), gradients, gradient-based ICS (Def. 2.1: ``ics_l2``, ``ics_cos`` per
    layer) and loss-landscape probes along the gradient (``loss_variation``,
    ``beta_smoothness``, ``landscape_*`` at 0.25…4× the lr) at every 5th record, with the
    cross-entropy loss and BN in train mode.
    """
    return Preset(
        name="noisy-bn",
        description="Santurkar et al. 2018: BN vs noisy BN vs none; drift, gradient ICS, landscape",
        claims=(_CLAIM_NOISY, _CLAIM_SANT_ICS, _CLAIM_SANT_SMOOTH),
        conditions=(
            _mlp("bn", FIG1_LR, "BN sigmoid MLP", bn=True),
            _mlp(
                "noisy-bn", FIG1_LR, "BN sigmoid MLP with noise after each BN", bn=True, noise=True
            ),
            _mlp("baseline", FIG1_LR, "no-BN sigmoid MLP", bn=False),
        ),
        steps=20_000,
        records=50,
        record={"probe_sample": 1000, "gradients": True},
        ics_every=5,
        landscape_every=5,
    )


#: SGD learning rate of the ``cnn`` preset: the best of (0.1, 0.3, 1.0) for the no-BN CNN.
CNN_LR = 0.3


@_preset
def _cnn() -> Preset:
    """§3.2: a small CNN on 1×28×28 MNIST images, ``BatchNorm2d`` (per-channel) vs none.

    ``small_cnn((16, 32, 32), in_channels=1, pool=True)``: three 3×3 conv blocks (conv → BN →
    ReLU, 2×2 max-pooling after the first two), global average pooling, a linear classifier; the
    no-BN variant has conv biases instead. PyTorch's default initialization, plain SGD at lr 0.3
    (``CNN_LR``), batches of 60, 5,000 steps, 5 seeds. The rate is the no-BN network's best of
    (0.1, 0.3, 1.0) after 1,500 steps (seed 0, test accuracy on 2,000 images: 0.915, 0.955,
    0.098 (stuck); with BN 0.960 at 0.1 and 0.942 at 0.3), used for both. Recorded: the ReLU
    inputs (units = channels, pooled over batch and locations, as BN does) on the training batch
    and a probe of 256 test images (1,000 sampled positions per channel), gradients; test
    accuracy on 2,000 test images during training (all 10,000 at the end).
    """
    kw = {"channels": (16, 32, 32), "in_channels": 1, "pool": True}
    return Preset(
        name="cnn",
        description="§3.2: small CNN on MNIST images, BatchNorm2d (per channel) vs none",
        claims=(_CLAIM_CNN,),
        conditions=(
            Condition(
                "baseline",
                small_cnn,
                {**kw, "bn": False},
                lr=CNN_LR,
                description="3 conv blocks with bias, no BN",
            ),
            Condition(
                "bn",
                small_cnn,
                {**kw, "bn": True},
                lr=CNN_LR,
                description="3 conv blocks with BatchNorm2d",
            ),
        ),
        steps=5_000,
        data="mnist-image",
        records=50,
        eval_size=2000,
        probe_size=256,
        record={"probe_sample": 1000, "gradients": True},
        quick_steps=100,
    )


#: Dropout probabilities of the ``regularization`` preset (MLP, CNN).
REG_DROPOUT = {"mlp": 0.2, "cnn": 0.1}


@_preset
def _regularization() -> Preset:
    """§3.4 (BN regularizes, less need for dropout) on the §4.1 MLP and on the ``cnn`` CNN.

    Eight conditions: the §4.1 sigmoid MLP (``FIG1_LR``, 20,000 steps) and the ``cnn``
    preset's CNN (``small_cnn((16, 32, 32), pool=True)`` on the flattened images, reshaped by
    its first module; ``CNN_LR``, 2,000 steps), each without and with BN, without and with
    dropout after every hidden nonlinearity (``-dropout``: p = 0.2 in the MLP's layers of
    100, p = 0.1 after the CNN's blocks), 5 seeds. The paper's MLP overfits MNIST slowly:
    20,000 steps (20 epochs) are where its training accuracy exceeds its test accuracy by a
    point or more; the CNN is cut to 2,000 steps (2 epochs) to keep the preset affordable on
    2 cores.

    Measured (``measure="generalization"``, at every 5th record and the last one): the loss
    and accuracy of the network as deployed (eval mode: BN's running averages, no dropout) on
    the first 10,000 training images and on all 10,000 test images, logged as
    ``gen_train_loss``, ``gen_train_acc``, ``gen_test_loss``, ``gen_test_acc``, ``gen_gap_acc``
    (train − test accuracy) and ``gen_gap_loss`` (test − train loss). Recorded besides: the
    nonlinearities' inputs on the training batch and on a probe of 256 test images.
    """
    conds = []
    for bn in (False, True):
        for drop in (False, True):
            name = f"{'bn' if bn else 'baseline'}{'-dropout' if drop else ''}"
            what = f"{'with' if bn else 'without'} BN, {'with' if drop else 'no'} dropout"
            p = REG_DROPOUT["mlp"] if drop else 0.0
            conds.append(_mlp(name, FIG1_LR, f"§4.1 sigmoid MLP {what}", bn=bn, dropout=p))
    for bn in (False, True):
        for drop in (False, True):
            name = f"cnn-{'bn' if bn else 'baseline'}{'-dropout' if drop else ''}"
            what = f"{'with' if bn else 'without'} BN, {'with' if drop else 'no'} dropout"
            kw = {"channels": (16, 32, 32), "in_channels": 1, "pool": True, "flat_input": True}
            conds.append(
                Condition(
                    name,
                    small_cnn,
                    {**kw, "bn": bn, "dropout": REG_DROPOUT["cnn"] if drop else 0.0},
                    lr=CNN_LR,
                    steps=2_000,
                    description=f"the cnn preset's CNN {what}",
                )
            )
    return Preset(
        name="regularization",
        description="§3.4: MLP and CNN, BN × dropout; train and test loss and accuracy, the gap",
        claims=(_CLAIM_REG,),
        conditions=tuple(conds),
        steps=20_000,
        records=20,
        eval_every=5,
        eval_size=2000,
        probe_size=256,
        measure="generalization",
        measure_every=5,
        quick_steps=100,
        quick_measure_kwargs={"train_size": 1000, "test_size": 1000},
    )


#: SGD learning rate of ``landscape-cnn``: Santurkar et al.'s rate for VGG without BN (0.1);
#: both networks train at it (see the preset).
LANDSCAPE_CNN_LR = 0.1

#: Stages of the ``landscape-cnn`` network (:func:`vgg_cnn`): eight 3×3 convolutions.
LANDSCAPE_CNN_STAGES = ((8, 8), (16, 16), (32, 32), (32, 32))


@_preset
def _landscape_cnn() -> Preset:
    """Santurkar et al. 2018 §3, Fig. 4, on a deeper VGG-style CNN: BN vs none on MNIST images.

    ``vgg_cnn(((8, 8), (16, 16), (32, 32), (32, 32)))``: eight 3×3 convolutions in four stages
    (28×28 → 14 → 7 → 3 → 1, 2×2 max-pooling after each), BN and ReLU after each convolution
    (no BN: conv biases), He initialization, global average pooling, a linear classifier.
    Plain SGD at lr 0.1 (``LANDSCAPE_CNN_LR``, their VGG rate), batches of 60, 1,500 steps,
    5 seeds. Recorded at every 2nd of 20 records (plus early ones), before the update, on the
    step's batch with BN in train mode: the loss-landscape probes along the gradient at 0.25,
    0.5, 1, 2 and 4 × the lr (``loss_variation``: range of the loss; ``landscape_grad_diff``:
    ‖∇L(w) − ∇L(w − ηg)‖, gradient predictiveness; ``beta_smoothness``: the largest ratio of
    that change to ‖ηg‖); the ReLU inputs (units = channels) on the batch and a probe of 256
    test images; test accuracy on 2,000 test images.

    Why this size. The claims were inconclusive on the 3-layer MLP (``noisy-bn``), and
    Santurkar et al.'s clear effects are on deep convolutional networks. Eight convolutions
    make the network deep enough that initialization matters: with PyTorch's default
    initialization the network without BN stays at chance (seed 0, 400 steps at lr 0.1 and
    0.03: 0.114 and 0.114; BN: 0.969, 0.965), with He initialization both train (no BN 0.948,
    BN 0.975 at lr 0.1; test accuracy on 2,000 images). The widths (8 to 32 channels) and 1,500
    steps keep the 10 runs within about 30 minutes on 2 shared CPU cores (a training step of
    the three-stage network with 16–64 channels took 3.6× as long as with 8–32).
    """
    conds = tuple(
        Condition(
            "bn" if bn else "baseline",
            vgg_cnn,
            {"stages": LANDSCAPE_CNN_STAGES, "in_channels": 1, "bn": bn},
            lr=LANDSCAPE_CNN_LR,
            description=f"8-conv VGG-style CNN {'with BatchNorm2d' if bn else 'with conv biases'}",
        )
        for bn in (False, True)
    )
    return Preset(
        name="landscape-cnn",
        description="Santurkar et al. Fig. 4: VGG-style CNN, BN vs none; loss landscape probes",
        claims=(_CLAIM_SANT_VGG,),
        conditions=conds,
        steps=1_500,
        data="mnist-image",
        records=20,
        eval_size=2000,
        probe_size=256,
        landscape_every=2,
        quick_steps=50,
    )
