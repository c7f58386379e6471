"""Sites: which tensors of a model are recorded, and how their units are laid out.

A *site* is one tensor role of one named module: its ``input`` (first floating-point tensor
among the positional, then keyword arguments of ``forward``) or its ``output`` (first
floating-point tensor found depth-first in what ``forward`` returns: tuples, lists and dicts are
searched, ``None`` skipped). Sites are named ``"<module name>:<role>"``, as in ``"3:input"`` or
``"encoder.layers.0.linear1:output"``; the model itself (name ``""``) is not a site.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from icstools.functional.statistics import SIGMOID_SATURATION, TANH_SATURATION

__all__ = [
    "ACTIVATION_TYPES",
    "FOREIGN_ACTIVATIONS",
    "ROLES",
    "Site",
    "SiteSelectionError",
    "default_unit_dim",
    "find_tensor",
    "is_nonlinearity",
    "layout_module",
    "list_sites",
    "select_sites",
]

ROLES = ("input", "output")

#: Element-wise nonlinearities whose inputs are recorded when no sites are given.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.Sigmoid,
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
)

#: Libraries whose activation modules are element-wise nonlinearities too (recognised by the
#: Python module that defines their class, without importing the library), with the classes of
#: that module that are not: Hugging Face's ``NewGELUActivation``, ``GELUActivation``,
#: ``FastGELUActivation``, ``QuickGELUActivation``, ``GELUTanh``, ... count; its identity
#: ``LinearActivation`` does not.
FOREIGN_ACTIVATIONS: dict[str, frozenset[str]] = {
    "transformers.activations": frozenset({"LinearActivation"}),
}


def is_nonlinearity(module: nn.Module) -> bool:
    """Whether ``module`` is an element-wise nonlinearity (a default site).

    True for :data:`ACTIVATION_TYPES` and for the activation modules of the libraries in
    :data:`FOREIGN_ACTIVATIONS` (Hugging Face ``transformers``), subclasses included.

    Examples
    --------
    >>> is_nonlinearity(nn.GELU()), is_nonlinearity(nn.Linear(2, 2))
    (True, False)
    """
    if isinstance(module, ACTIVATION_TYPES):
        return True
    for cls in type(module).__mro__:
        excluded = FOREIGN_ACTIVATIONS.get(cls.__module__)
        if excluded is not None:
            return cls.__name__ not in excluded
    return False


# Module types whose 3-D tensors are [N, C, L] (units on dim 1) rather than [batch, time, features].
_CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
    nn.LPPool1d,
    nn.Dropout1d,
)

Selector = str | type | Callable[[str, nn.Module], bool] | Sequence["Selector"] | None


class SiteSelectionError(ValueError):
    """A site selector that matches nothing, or names a site that does not exist."""


@dataclass(frozen=True)
class Site:
    """One recorded tensor: the ``role`` (``"input"``/``"output"``) of module ``module_name``."""

    module_name: str
    role: str

    @property
    def name(self) -> str:
        """The site name, ``"<module name>:<role>"``."""
        return f"{self.module_name}:{self.role}"

    def default_saturation(self, module: nn.Module) -> float | None:
        """``|x|`` threshold of ``sat_frac`` for this site, or ``None`` where none applies.

        Inputs of sigmoid and tanh saturate where the derivative falls below 0.01:
        ``|x| > 4.585`` (sigmoid), ``|x| > 2.993`` (tanh).
        """
        if self.role != "input":
            return None
        if isinstance(module, nn.Sigmoid):
            return SIGMOID_SATURATION
        if isinstance(module, nn.Tanh):
            return TANH_SATURATION
        return None


def layout_module(model: nn.Module, site: Site) -> nn.Module:
    """The module whose type tells the layout of ``site``'s 3-D tensors.

    An element-wise nonlinearity keeps the layout of what feeds it, so for those the leaf module
    defined just before it is used (exact for ``nn.Sequential`` models); otherwise the site's
    own module.

    Examples
    --------
    >>> m = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU())
    >>> type(layout_module(m, Site("1", "input"))).__name__
    'Conv1d'
    """
    module = model.get_submodule(site.module_name)
    if not is_nonlinearity(module):
        return module
    previous = None
    for name, m in model.named_modules():
        if name == site.module_name:
            break
        if not list(m.children()) and not is_nonlinearity(m):
            previous = m
    return previous if previous is not None else module


def default_unit_dim(module: nn.Module, x: torch.Tensor) -> int:
    """The dimension of ``x`` whose entries are units.

    ``[features]`` → 0; ``[batch, features]`` → 1; ``[batch, time, features]`` → 2, or 1 when
    ``module`` is convolution-like (``[N, C, L]``: pass :func:`layout_module` of the site);
    4-D and 5-D (``[N, C, H, W]``, ...) → 1.

    Examples
    --------
    >>> default_unit_dim(nn.ReLU(), torch.zeros(8, 3, 5, 5))
    1
    """
    if x.ndim <= 1:
        return 0
    if x.ndim == 2:
        return 1
    if x.ndim == 3:
        return 1 if isinstance(module, _CHANNEL_FIRST_TYPES) else 2
    return 1


def find_tensor(obj: object) -> torch.Tensor | None:
    """First floating-point tensor in ``obj`` (depth-first through tuples, lists and dicts).

    Examples
    --------
    >>> find_tensor((None, {"h": torch.ones(2)})).tolist()
    [1.0, 1.0]
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() and obj.ndim > 0 else None
    if isinstance(obj, (tuple, list)):
        items: Iterable[object] = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        return None
    for item in items:
        found = find_tensor(item)
        if found is not None:
            return found
    return None


def list_sites(model: nn.Module, roles: Sequence[str] = ROLES) -> list[str]:
    """All site names of ``model``, in module order.

    Examples
    --------
    >>> list_sites(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid()))
    ['0:input', '0:output', '1:input', '1:output']
    """
    _check_roles(roles)
    return [f"{name}:{role}" for name, _ in model.named_modules() if name for role in roles]


def _check_roles(roles: Sequence[str]) -> None:
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise SiteSelectionError(
            f"Roles {bad or roles!r} are not valid. Expected one or more of {ROLES}"
        )


def select_sites(
    model: nn.Module, sites: Selector = None, role: str | Sequence[str] | None = None
) -> list[Site]:
    """Resolve a site selector to the sites of ``model``, in module order, without duplicates.

    Parameters
    ----------
    model : torch.nn.Module
    sites : str, type, callable, list of these, or None
        - ``None``: the inputs of every element-wise nonlinearity (:func:`is_nonlinearity`:
          :data:`ACTIVATION_TYPES` and Hugging Face's activation modules such as GPT-2's
          ``NewGELUActivation``), which is where the paper measures (the input of the sigmoid);
        - a module type, e.g. ``nn.Sigmoid`` (``isinstance``);
        - a name or glob of module names, e.g. ``"fc3"`` or ``"features.*"``, optionally with
          its role, e.g. ``"fc3:input"`` or ``"layers.*:output"``;
        - a predicate ``(module_name, module) -> bool``;
        - a list mixing any of these (the union).
    role : str or sequence of str, optional
        Role(s) for selectors that don't carry one: ``"input"``, ``"output"`` or both.
        Default: ``"input"`` for ``sites=None``, else ``"output"``.

    Returns
    -------
    list of Site

    Raises
    ------
    SiteSelectionError
        When a selector matches no module; for a plain name, the message lists the closest
        existing names.

    Examples
    --------
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    >>> [s.name for s in select_sites(m, nn.Sigmoid, role="input")]
    ['1:input']
    >>> [s.name for s in select_sites(m, ["0", "2:input"])]
    ['0:output', '2:input']
    """
    if role is None:
        roles: tuple[str, ...] = ("input",) if sites is None else ("output",)
    elif isinstance(role, str):
        roles = (role,)
    else:
        roles = tuple(role)
    _check_roles(roles)
    modules = [(name, m) for name, m in model.named_modules() if name]
    if not modules:
        raise SiteSelectionError(f"{type(model).__name__} has no submodules to record")
    chosen: set[Site] = set()
    if sites is None:
        matched = [n for n, m in modules if is_nonlinearity(m)]
        if not matched:
            raise SiteSelectionError(
                f"{type(model).__name__} has no element-wise nonlinearity modules "
                f"({', '.join(t.__name__ for t in ACTIVATION_TYPES[:4])}, ...); pass sites= "
                f"explicitly, e.g. a list from icstools.list_sites(model)"
            )
        chosen.update(Site(n, r) for n in matched for r in roles)
    else:
        for selector in _flatten(sites):
            chosen.update(_match(selector, modules, roles))
    order = {name: i for i, (name, _) in enumerate(modules)}
    return sorted(chosen, key=lambda s: (order[s.module_name], ROLES.index(s.role)))


def _flatten(sites: Selector) -> list[object]:
    if isinstance(sites, (list, tuple, set, frozenset)):
        out: list[object] = []
        for s in sites:
            out.extend(_flatten(s))
        if not out:
            raise SiteSelectionError("sites is an empty list; pass None for the default sites")
        return out
    return [sites]


def _match(
    selector: object, modules: list[tuple[str, nn.Module]], roles: tuple[str, ...]
) -> list[Site]:
    names = [n for n, _ in modules]
    if isinstance(selector, type) and not issubclass(selector, nn.Module):
        raise TypeError(
            f"A type selector must be an nn.Module subclass (e.g. nn.Sigmoid), got {selector!r}"
        )
    if isinstance(selector, type):
        matched = [n for n, m in modules if isinstance(m, selector)]
        if not matched:
            present = sorted({type(m).__name__ for _, m in modules})
            raise SiteSelectionError(
                f"No module of type {selector.__name__} in the model. Types present: {present}"
            )
        return [Site(n, r) for n in matched for r in roles]
    if isinstance(selector, str):
        pattern, sep, role_pattern = selector.rpartition(":")
        if not sep:
            pattern, role_pattern = selector, ""
        site_roles = [r for r in ROLES if fnmatch.fnmatchcase(r, role_pattern)] if sep else roles
        if sep and not site_roles:
            raise SiteSelectionError(
                f"Role {role_pattern!r} in site {selector!r} is not valid. Expected one of {ROLES}"
            )
        if any(c in pattern for c in "*?["):
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            matched = [pattern] if pattern in names else []
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            hint = f" Closest modules: {close}." if close else f" Modules: {names[:10]}..."
            raise SiteSelectionError(f"No module named {pattern!r} (site {selector!r}).{hint}")
        return [Site(n, r) for n in matched for r in site_roles]
    if callable(selector):
        matched = [n for n, m in modules if selector(n, m)]
        if not matched:
            raise SiteSelectionError(f"The predicate {selector!r} matched no module")
        return [Site(n, r) for n in matched for r in roles]
    raise TypeError(
        f"A site selector must be a name/glob string, an nn.Module type, a predicate "
        f"(name, module) -> bool, or a list of these; got {type(selector).__name__}: {selector!r}"
    )
