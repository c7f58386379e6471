"""``icstools sites TARGET``: the hookable sites of a model, with shapes and unit layouts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from icstools.commands.common import UsageError, print_table

__all__ = ["shape", "sites"]


def _guess_input_shape(model: Any) -> tuple[int, ...] | None:
    """One example's shape from the first leaf module (Linear / Conv), else None."""
    from torch import nn

    for _, m in model.named_modules():
        if list(m.children()):
            continue
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, nn.Conv1d):
            return (m.in_channels, 32)
        if isinstance(m, nn.Conv2d):
            return (m.in_channels, 28, 28)
        if isinstance(m, nn.Conv3d):
            return (m.in_channels, 8, 8, 8)
        return None
    return None


def _site_rows(model: Any, input_shape: tuple[int, ...] | None) -> list[dict[str, str]]:
    """One row per site: name, module type, tensor shape and unit layout, default mark."""
    import torch

    from icstools.recording.hooks import HookGroup
    from icstools.recording.isolation import isolated
    from icstools.sites import (
        Site,
        SiteSelectionError,
        default_unit_dim,
        find_tensor,
        layout_module,
        list_sites,
        select_sites,
    )

    try:
        default = {s.name for s in select_sites(model, None)}
    except SiteSelectionError:
        default = set()
    shapes: dict[str, tuple[int, ...]] = {}
    if input_shape is not None:
        with HookGroup() as hooks:
            for name, module in model.named_modules():
                if not name:
                    continue

                def pre(mod, args, kwargs, name=name):
                    t = find_tensor(args) if args else find_tensor(kwargs)
                    if t is not None:
                        shapes.setdefault(f"{name}:input", tuple(t.shape))

                def post(mod, args, output, name=name):
                    t = find_tensor(output)
                    if t is not None:
                        shapes.setdefault(f"{name}:output", tuple(t.shape))

                hooks.forward_pre(module, pre, with_kwargs=True)
                hooks.forward(module, post)
            try:
                with isolated(model, mode="eval", grad=False):
                    model(torch.rand(2, *input_shape))
            except Exception as exc:
                raise UsageError(
                    f"the model does not accept inputs of shape [batch, "
                    f"{', '.join(map(str, input_shape))}]: {exc} (give one example's shape "
                    "with --input-shape)"
                ) from None
    rows = []
    for site_name in list_sites(model):
        module_name, _, role = site_name.rpartition(":")
        module = model.get_submodule(module_name)
        shape = shapes.get(site_name)
        if shape is None:
            shown, units = "-", "-" if input_shape is not None else "?"
        else:
            x = torch.empty(shape, device="meta")
            ud = default_unit_dim(layout_module(model, Site(module_name, role)), x)
            dims = ["B", *map(str, shape[1:])]
            shown = "[" + ", ".join(dims) + "]"
            pooled = [n for d, n in enumerate(_dim_names(len(shape), ud)) if d != ud]
            units = f"{shape[ud]} (dim {ud}; pooled over {', '.join(pooled)})"
        rows.append(
            {
                "": "*" if site_name in default else "",
                "site": site_name,
                "module": type(module).__name__,
                "shape": shown,
                "units": units,
            }
        )
    return rows


def _dim_names(ndim: int, unit_dim: int) -> list[str]:
    """Conventional names of a site tensor's dimensions (``N`` the batch)."""
    known = {
        2: ["N", "F"],
        3: ["N", "C", "L"] if unit_dim == 1 else ["N", "T", "F"],
        4: ["N", "C", "H", "W"],
        5: ["N", "C", "D", "H", "W"],
    }
    return known.get(ndim, ["N", *(f"d{d}" for d in range(1, ndim))])


def _print_sites(title: str, model: Any, input_shape: tuple[int, ...] | None) -> None:
    shape = "?" if input_shape is None else "[batch, " + ", ".join(map(str, input_shape)) + "]"
    rows = _site_rows(model, input_shape)
    print(f"{title}  (input {shape})")
    if not rows:
        print("  (no submodules: nothing to hook)")
        return
    print_table(rows)


def sites(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from icstools.experiments import DATA_SHAPES, PRESETS, get_preset, load_factory
    from icstools.recording.isolation import isolated

    input_shape = args.input_shape
    if ":" in args.target:
        try:
            kwargs = json.loads(args.kwargs) if args.kwargs else {}
        except json.JSONDecodeError as exc:
            raise UsageError(f"--kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        try:
            factory = load_factory(args.target)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            model = factory(**kwargs)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"calling {args.target}(**{json.dumps(kwargs)}) failed: {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"{args.target} returned a {type(model).__name__}, not an nn.Module")
        if input_shape is None:
            input_shape = _guess_input_shape(model)
        _print_sites(f"{args.target} {json.dumps(kwargs)}", model, input_shape)
    else:
        if args.kwargs:
            raise UsageError("--kwargs applies to a model factory target, not to a preset")
        if args.target not in PRESETS:
            raise UsageError(
                f"unknown preset {args.target!r}; valid presets: {', '.join(PRESETS)}; or give "
                "a model factory as package.module:factory"
            )
        preset = get_preset(args.target)
        input_shape = input_shape or DATA_SHAPES[preset.data]
        seen: dict[str, list[str]] = {}
        for cond in preset.conditions:
            key = json.dumps(cond.settings()["model"]) + json.dumps(cond.settings()["kwargs"])
            seen.setdefault(key, []).append(cond.name)
        first = True
        for names in seen.values():
            cond = preset.condition(names[0])
            with isolated():
                torch.manual_seed(0)
                model = cond.build()
            if not first:
                print()
            first = False
            _print_sites(f"{preset.name} / {', '.join(names)}", model, input_shape)
    print("\n* recorded by default (inputs of element-wise nonlinearities, the paper's sites)")
    return 0


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected one example's shape without the batch, e.g. 784 or 1,28,28; got {text!r}"
        )
    return dims
