"""The claims the report tests: the :class:`Claim` type, the table :data:`CLAIMS`, the metric
of each claim in words (:data:`METRIC_DESCRIPTIONS`) and its decision rule (:func:`rule_text`).

Claims
------
The claims are the rows of :data:`CLAIMS`, one table: the claim and its source, the preset
whose runs test it, the metric (one number per run: a name of the run-level metric registry
:data:`icstools.analysis.metrics.METRICS`, with the keyword arguments the claim passes where
they differ from the registry's defaults), the comparison (a condition against a reference
condition of the preset), and the decision rule (``statistic``, ``expect``, ``margin``;
:func:`rule_text` says it in words, and the report prints it beside each verdict). How the rule
is applied is in :mod:`icstools.report.verdicts`.

Drift metric of the Fig. 1 claims
---------------------------------
The registry's ``"drift"`` with ``reference="previous", how="mean"``: W1 / σ (Wasserstein-1
distance in units of the reference's standard deviation, exact from the probe values kept
with ``probe_sample``, else from the quantile summaries) of each unit of the input of the last
hidden nonlinearity (the last site with a saturation threshold, else the last site), on the
probe (fixed inputs, so only parameter changes move it), **each record against the previous
record**, averaged over records and units. Against the previous record rather than the first:
the rate of change is what "the layers need to continuously adapt" is about, and it does not
depend on the initial scale (against the first record, a baseline layer whose initial σ is tiny
shows a huge W1/σ whatever happens next).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from icstools.analysis.metrics import METRICS

__all__ = [
    "CLAIMS",
    "CONFIDENCE_LEVEL",
    "METRIC_DESCRIPTIONS",
    "VERDICTS",
    "Claim",
    "band",
    "rule_text",
]

#: The three verdicts.
VERDICTS: tuple[str, ...] = ("supported", "not supported", "inconclusive")
#: Confidence level of the intervals over seeds (Welch's t, Fieller's; see verdicts).
CONFIDENCE_LEVEL = 0.95

_STATISTICS = ("ratio", "diff", "counts", "max-error", "all-of")
_EXPECTS = ("lower", "higher", "equal", "not-higher", "within-tolerance", "all")


@dataclass(frozen=True)
class Claim:
    """One row of :data:`CLAIMS`.

    Attributes
    ----------
    id : str
        ``"<preset>/<name>"``.
    preset : str
        The preset whose runs test it.
    claim : str
        The claim, as its source makes it.
    source : str
        Paper and section.
    metric : str
        Name of a run-level metric of :data:`icstools.analysis.metrics.METRICS` (one number
        per run; described in :data:`METRIC_DESCRIPTIONS`).
    comparison : (str, str)
        ``(condition, reference)``: names of the preset's conditions; ``{max}``/``{min}`` in a
        name pick the condition with the largest/smallest number there
        (``"init-bn-depth{max}"``), a trailing ``*`` any condition starting with the rest.
    statistic : {"ratio", "diff", "counts", "max-error", "all-of"}
        ``ratio`` = mean(condition) / mean(reference), ``diff`` = mean(condition) −
        mean(reference); ``counts``, ``max-error``, ``all-of``: see ``rule``.
    expect : {"lower", "higher", "equal", "not-higher", "within-tolerance", "all"}
        What the claim predicts for the statistic.
    margin : float
        Half-width of the equivalence band around the null value (see the module docstring).
    rule : str
        The decision rule in words when :func:`rule_text` cannot derive it.
    parts : tuple of str
        For ``all-of``: the ids of the claims it is made of.
    metric_kwargs : mapping
        Keyword arguments of the metric where the claim differs from the registry's defaults
        (:attr:`icstools.analysis.metrics.Metric.defaults`).
    """

    id: str
    preset: str
    claim: str
    source: str
    metric: str
    comparison: tuple[str, str]
    statistic: str
    expect: str
    margin: float
    rule: str = ""
    parts: tuple[str, ...] = ()
    metric_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.metric:
            unknown = set(self.metric_kwargs) - set(METRICS[self.metric].defaults)
            if unknown:
                raise ValueError(
                    f"claim {self.id!r}: metric {self.metric!r} takes no {sorted(unknown)}; its "
                    f"keywords: {sorted(METRICS[self.metric].defaults)}"
                )
        if self.statistic not in _STATISTICS:
            raise ValueError(f"statistic must be one of {_STATISTICS}, got {self.statistic!r}")
        if self.expect not in _EXPECTS:
            raise ValueError(f"expect must be one of {_EXPECTS}, got {self.expect!r}")


_IS = "Ioffe & Szegedy 2015"
_SA = "Santurkar et al. 2018"
_LR_RULE = (
    "Conditions '[<family>-]<bn|baseline>-x<m>' (families, e.g. 'relu-', are assessed "
    "separately). A run trains if it did not diverge (no diverged_step, no infinite loss) and "
    "its final test_acc is at least the mean final test_acc of its family's 'baseline-x1' "
    "minus 0.05 (0.5 without that condition). At a multiplier m > 1, the "
    "claim holds if every BN run (at least 2) trains and no baseline run (at least 2) does; "
    "it fails at m if no BN run trains, or if every baseline run trains too. Supported if "
    "it holds at some m > 1 in some family; not supported if it fails at every m > 1 in "
    "every family; inconclusive otherwise. Effect: final test_acc, BN minus baseline, at the "
    "largest m where it holds (else the largest m), with its Welch t CI."
)
_IDENTITY_RULE = (
    "Logged relative errors si_output, si_input_grad, si_weight_grad (worst over layers and "
    "scales; any scalar named scale_* or si_* when these are absent) of every run of the BN "
    "conditions, at every record where measured. Supported if each is at most 1e-3 (float32 "
    "rounding) or explained by BN's ε (at most 2 × si_eps_effect of its record); not "
    "supported if one exceeds 1e-2 without being explained by ε; inconclusive otherwise "
    "(including no measurement). Deterministic: no interval over seeds."
)

#: Keyword arguments of the drift claims: W1/σ against the previous record, mean over records
#: and units (see the module docstring; the registry's defaults are "first" and "median").
_DRIFT: Mapping[str, Any] = MappingProxyType({"reference": "previous", "how": "mean"})

#: The claims, their metrics, comparisons and decision rules: one row per claim.
#: Columns: id, preset, claim, source, metric, (condition, reference), statistic, expect,
#: margin [, rule, parts] [, metric_kwargs].
CLAIMS: tuple[Claim, ...] = (
    # ---------------------------------------------------------------- fig1 (§4.1, Fig. 1)
    Claim("fig1/ics-drift", "fig1",
          "With BN the distribution of the sigmoid inputs of the last hidden layer is much more "
          "stable during training: less internal covariate shift.",
          f"{_IS} §4.1, Fig. 1(b, c)",
          "drift", ("bn", "baseline"), "ratio", "lower", 0.10, metric_kwargs=_DRIFT),
    Claim("fig1/faster", "fig1",
          "The batch-normalized network trains faster (higher test accuracy along training).",
          f"{_IS} §4.1, Fig. 1(a)",
          "mean_acc", ("bn", "baseline"), "diff", "higher", 0.005),
    Claim("fig1/higher-accuracy", "fig1",
          "The batch-normalized network reaches a higher test accuracy.",
          f"{_IS} §4.1, Fig. 1(a)",
          "final_acc", ("bn", "baseline"), "diff", "higher", 0.005),
    # ---------------------------------------------------------------- lr-sweep (§3.3, §4.2.2)
    Claim("lr-sweep/higher-lr", "lr-sweep",
          "BN allows much higher learning rates (×5, ×30) without divergence; without BN the "
          "same increase diverges or degrades training.",
          f"{_IS} §3.3, §4.2.2",
          "final_acc", ("bn-x{m}", "baseline-x{m}"), "counts", "higher", 0.0, _LR_RULE),
    # ---------------------------------------------------------------- saturating (§3.3)
    Claim("saturating/sigmoid-trainable", "saturating",
          "BN makes a deep sigmoid network trainable where it gets stuck without BN.",
          f"{_IS} §3.3, §4.2.2",
          "final_acc", ("sigmoid-bn", "sigmoid"), "diff", "higher", 0.01),
    Claim("saturating/sigmoid-saturation", "saturating",
          "BN keeps the sigmoid inputs out of the saturated regime.",
          f"{_IS} §3.3",
          "sat_frac_mean", ("sigmoid-bn", "sigmoid"), "diff", "lower", 0.005),
    Claim("saturating/tanh-trainable", "saturating",
          "BN makes a deep tanh network trainable where it gets stuck without BN.",
          f"{_IS} §3.3, §4.2.2",
          "final_acc", ("tanh-bn", "tanh"), "diff", "higher", 0.01),
    Claim("saturating/tanh-saturation", "saturating",
          "BN keeps the tanh inputs out of the saturated regime.",
          f"{_IS} §3.3",
          "sat_frac_mean", ("tanh-bn", "tanh"), "diff", "lower", 0.005),
    # ---------------------------------------------------------------- scale-invariance (§3.3)
    Claim("scale-invariance/identities", "scale-invariance",
          "With BN, back-propagation through a layer is invariant to the scale of its weights: "
          "BN((aW)u) = BN(Wu), ∂ℓ/∂u unchanged, ∂ℓ/∂(aW) = (1/a) ∂ℓ/∂W.",
          f"{_IS} §3.3",
          "identities", ("bn*", ""), "max-error", "within-tolerance", 0.0, _IDENTITY_RULE),
    # ---------------------------------------------------------------- jacobian (§3.3; Yang)
    Claim("jacobian/near-one", "jacobian",
          "BN keeps the singular values of the layer Jacobians close to 1 (conjecture).",
          f"{_IS} §3.3",
          "jac_near_one", ("bn", "baseline"), "diff", "higher", 0.02),
    Claim("jacobian/gradient-explosion", "jacobian",
          "At initialization, gradients explode with depth in batch-normalized networks.",
          "Yang et al. 2019",
          "grad_explosion", ("init-bn-depth{max}", "init-bn-depth{min}"), "diff", "higher", 0.1),
    # ---------------------------------------------------------------- noisy-bn (Santurkar)
    Claim("noisy-bn/noisy-drifts-more", "noisy-bn",
          "The layer inputs of a network with noisy BN are far less stable than with BN.",
          f"{_SA} §2",
          "drift", ("noisy-bn", "bn"), "ratio", "higher", 0.10, metric_kwargs=_DRIFT),
    Claim("noisy-bn/noisy-trains-as-well", "noisy-bn",
          "A network with noisy BN trains about as well as with BN (final test accuracy "
          "within 2 points).",
          f"{_SA} §2",
          "final_acc", ("noisy-bn", "bn"), "diff", "equal", 0.02),
    Claim("noisy-bn/not-ics", "noisy-bn",
          "BN's benefit does not come from reducing internal covariate shift: noisy BN shifts "
          "the distributions more, yet trains as well.",
          f"{_SA} §2",
          "", ("", ""), "all-of", "all", 0.0,
          "Supported if both parts are supported; not supported if either is not supported; "
          "inconclusive otherwise.",
          ("noisy-bn/noisy-drifts-more", "noisy-bn/noisy-trains-as-well")),
    Claim("noisy-bn/gradient-ics", "noisy-bn",
          "Measured through gradients (Def. 2.1), BN does not reduce internal covariate shift: "
          "the cosine between a layer's gradient before and after the previous layers' update "
          "is not higher with BN.",
          f"{_SA} §2.2",
          "ics_cos_mean", ("bn", "baseline"), "diff", "not-higher", 0.02),
    Claim("noisy-bn/smoother-beta", "noisy-bn",
          "BN makes the loss landscape smoother: lower effective β-smoothness along the "
          "gradient.",
          f"{_SA} §3",
          "beta", ("bn", "baseline"), "ratio", "lower", 0.10),
    Claim("noisy-bn/smoother-loss", "noisy-bn",
          "BN makes the loss landscape smoother: smaller variation of the loss along the "
          "gradient.",
          f"{_SA} §3",
          "loss_variation_mean", ("bn", "baseline"), "ratio", "lower", 0.10),
    # ---------------------------------------------------------------- regularization (§3.4)
    Claim("regularization/bn-narrows-gap", "regularization",
          "BN regularizes the model: the gap between training and test accuracy of the §4.1 "
          "MLP is smaller with BN.",
          f"{_IS} §3.4",
          "final_gen_gap_acc", ("bn", "baseline"), "diff", "lower", 0.002),
    Claim("regularization/bn-replaces-dropout", "regularization",
          "BN reduces the need for Dropout: the §4.1 MLP with BN and without dropout "
          "generalizes at least as well as without BN and with dropout (test accuracy of the "
          "dropout network not higher by more than 0.2 points).",
          f"{_IS} §3.4, §4.2.1",
          "final_gen_test_acc", ("baseline-dropout", "bn"), "diff", "not-higher", 0.002),
    Claim("regularization/cnn-bn-narrows-gap", "regularization",
          "BN regularizes the model: the gap between training and test accuracy of the CNN is "
          "smaller with BN.",
          f"{_IS} §3.4",
          "final_gen_gap_acc", ("cnn-bn", "cnn-baseline"), "diff", "lower", 0.002),
    Claim("regularization/cnn-bn-replaces-dropout", "regularization",
          "BN reduces the need for Dropout: the CNN with BN and without dropout generalizes at "
          "least as well as without BN and with dropout (test accuracy of the dropout network "
          "not higher by more than 0.2 points).",
          f"{_IS} §3.4, §4.2.1",
          "final_gen_test_acc", ("cnn-baseline-dropout", "cnn-bn"), "diff", "not-higher", 0.002),
    # ---------------------------------------------------------------- landscape-cnn (Santurkar)
    Claim("landscape-cnn/smoother-loss", "landscape-cnn",
          "With BN the loss changes less along the gradient (loss landscape, Fig. 4(a)).",
          f"{_SA} §3, Fig. 4",
          "loss_variation_mean", ("bn", "baseline"), "ratio", "lower", 0.10),
    Claim("landscape-cnn/predictive-gradients", "landscape-cnn",
          "With BN the gradients are more predictive: the gradient changes less along it "
          "(Fig. 4(b)).",
          f"{_SA} §3, Fig. 4",
          "grad_predictiveness", ("bn", "baseline"), "ratio", "lower", 0.10),
    Claim("landscape-cnn/smoother-beta", "landscape-cnn",
          "With BN the effective β-smoothness along the gradient is lower (Fig. 4(c)).",
          f"{_SA} §3, Fig. 4",
          "beta", ("bn", "baseline"), "ratio", "lower", 0.10),
    # ---------------------------------------------------------------- cnn (§3.2)
    Claim("cnn/higher-accuracy", "cnn",
          "BN normalizing per feature map brings convolutional networks the same benefit: a "
          "higher test accuracy.",
          f"{_IS} §3.2",
          "final_acc", ("bn", "baseline"), "diff", "higher", 0.005),
    Claim("cnn/ics-drift", "cnn",
          "BN normalizing per feature map makes the inputs of the last convolutional block's "
          "nonlinearity more stable during training.",
          f"{_IS} §3.2",
          "drift", ("bn", "baseline"), "ratio", "lower", 0.10, metric_kwargs=_DRIFT),
)  # fmt: skip


#: What each metric of :data:`CLAIMS` measures (one number per run), as the claims compute it:
#: the registry's description, or the report's own wording where its claims pass keyword
#: arguments (``drift``, ``mean_acc``) or reduce the metric further (``identities``).
_WORDING = {
    "drift": (
        "W1/σ drift of each unit of the last hidden nonlinearity's input (last site with a "
        "saturation threshold, else last site) on the probe, each record vs the previous "
        "record (exact from probe_sample when kept), mean over records and units"
    ),
    "mean_acc": (
        "mean test_acc over the steps where every compared run measured it (the area under "
        "the accuracy curve: higher means faster)"
    ),
    "identities": "relative errors of the §3.3 identities logged in the run (si_*, scale_*)",
}
METRIC_DESCRIPTIONS: dict[str, str] = {
    m: _WORDING.get(m, METRICS[m].description)
    for m in dict.fromkeys(c.metric for c in CLAIMS if c.metric)
}


def band(statistic: str, margin: float) -> tuple[float, float, float]:
    """The null value and the equivalence band ``(null, low, high)`` of a statistic: ``1`` and
    ``[1/(1+margin), 1+margin]`` for a ratio, ``0`` and ``[-margin, margin]`` for a
    difference."""
    if statistic == "ratio":
        return 1.0, 1.0 / (1.0 + margin), 1.0 + margin
    return 0.0, -margin, margin


def rule_text(claim: Claim) -> str:
    """The decision rule of ``claim`` in words.

    Examples
    --------
    >>> rule_text(CLAIMS[0])[:60]
    'ratio = mean(bn) / mean(baseline) over seeds; supported if t'
    """
    if claim.rule:
        return claim.rule
    cond, ref = claim.comparison
    if claim.statistic == "ratio":
        stat = f"ratio = mean({cond}) / mean({ref}) over seeds"
    else:
        stat = f"diff = mean({cond}) − mean({ref}) over seeds"
    null, lo, hi = band(claim.statistic, claim.margin)
    method = "Fieller" if claim.statistic == "ratio" else "Welch t"
    ci = f"the {CONFIDENCE_LEVEL:.0%} {method} CI"
    within = f"[{lo:.3g}, {hi:.3g}]"
    rest = (
        "; inconclusive otherwise (the CI includes "
        f"{null:g} and reaches beyond the band, or no CI: fewer than 2 finite runs in a "
        "condition)"
    )
    if claim.expect == "lower":
        return (
            f"{stat}; supported if {ci} lies below {null:g}; not supported if it lies above "
            f"{null:g} or inside {within} (no effect larger than the margin){rest}"
        )
    if claim.expect == "higher":
        return (
            f"{stat}; supported if {ci} lies above {null:g}; not supported if it lies below "
            f"{null:g} or inside {within} (no effect larger than the margin){rest}"
        )
    if claim.expect == "equal":
        return (
            f"{stat}; supported if {ci} lies inside {within} (equivalent); not supported if it "
            f"lies entirely outside {within}; inconclusive otherwise"
        )
    if claim.expect == "not-higher":
        return (
            f"{stat}; supported if {ci} ends below {hi:.3g} (not higher by more than the "
            f"margin); not supported if it starts above {hi:.3g}; inconclusive otherwise"
        )
    return claim.expect
