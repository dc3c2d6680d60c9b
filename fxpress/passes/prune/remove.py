"""Physical removal of dependency-group units, keeping the model whole, and the matching masks.

`remove_units` slices every parameter and buffer a unit names and then brings each touched module's
attributes in line with its new weights (Linear/Conv features, GroupNorm groups, LayerNorm shape,
an attention's head count), so the model still runs its own `forward`. `mask_units` zeroes the
consumer side of the same units in place (the columns of the layers that read the removed channels):
the pruned model must compute exactly what the masked model computes, and `check_removal` verifies it.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fxpress.errors import PassError
from fxpress.ir.dependency import Family, Unit
from fxpress.ir.graph import output_tensors

HEAD_COUNT_ATTRS = ("heads", "num_heads", "num_attention_heads", "n_heads")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _merged(units: Iterable[Unit]) -> dict[tuple[str, int], set[int]]:
    cut: dict[tuple[str, int], set[int]] = defaultdict(set)
    for unit in units:
        for key, idx in unit.slices.items():
            cut[key].update(idx)
    return cut


def _sync_module(module: nn.Module) -> dict[str, Any]:
    """Make a standard module's size attributes agree with its (sliced) weights; return what was set."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
        return {"out_features": module.out_features, "in_features": module.in_features}
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
        return {"out_channels": module.out_channels, "in_channels": module.in_channels}
    if isinstance(module, nn.GroupNorm) and module.affine:
        per_group = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        if module.num_channels % per_group:
            raise PassError(f"GroupNorm would keep {module.num_channels} channels, not whole groups of {per_group}",
                            "RemoveUnits")
        module.num_groups = module.num_channels // per_group
        return {"num_channels": module.num_channels, "num_groups": module.num_groups}
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        module.normalized_shape = tuple(module.weight.shape)
        return {"normalized_shape": list(module.normalized_shape)}
    if isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
        return {"num_embeddings": module.num_embeddings, "embedding_dim": module.embedding_dim}
    return {}


def _sizes(layer: nn.Module) -> tuple[int, int]:
    """Return (input, output) channels of a Linear or Conv from its weight."""
    groups = getattr(layer, "groups", 1)
    return int(layer.weight.shape[1]) * groups, int(layer.weight.shape[0])


def _sync_wrapper(parent: nn.Module, old_in: int, old_out: int, new: tuple[int, int]) -> dict[str, Any]:
    """A module wrapping exactly one layer (diffusers' Downsample2D: `channels`, `out_channels`) often
    mirrors its sizes and checks them in forward: update those mirrors; return what was set."""
    layers = [m for m in parent.children() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if len(layers) != 1 or isinstance(parent, (nn.Linear, nn.modules.conv._ConvNd)):
        return {}
    set_: dict[str, Any] = {}
    for attr, old, value in (("channels", old_in, new[0]), ("in_channels", old_in, new[0]),
                             ("in_features", old_in, new[0]), ("out_channels", old_out, new[1]),
                             ("out_features", old_out, new[1])):
        current = getattr(parent, attr, None)
        if isinstance(current, int) and not isinstance(current, bool) and current == old and old != value:
            setattr(parent, attr, value)
            set_[attr] = value
    return set_


def remove_units(model: nn.Module, removals: list[tuple[Family, list[Unit]]]) -> dict[str, dict[str, Any]]:
    """Remove `units` of each family from `model` in place; return the attributes it set, by module path.

    Raises PassError when a tensor would lose every channel of a dim, or when a module that splits
    heads has no head-count attribute fxpress knows how to update.
    """
    heads_removed: dict[str, int] = defaultdict(int)
    for family, units in removals:
        if family.kind == "head":
            heads_removed[family.host] += len(units)
    cuts = _merged(u for _, units in removals for u in units)
    for (name, dim), idx in cuts.items():
        owner, attr = _owner(model, name)
        if len(idx) >= getattr(owner, attr).shape[dim]:
            raise PassError(f"the removal would leave no channel in dim {dim} of {name}", "RemoveUnits")
    for host, count in heads_removed.items():
        module = model.get_submodule(host)
        if not any(isinstance(getattr(module, a, None), int) for a in HEAD_COUNT_ATTRS):
            raise PassError(f"{type(module).__name__} splits heads but has none of the attributes "
                            f"{HEAD_COUNT_ATTRS}; fxpress cannot tell it it has {count} fewer", "RemoveUnits",
                            module_path=host)
    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    touched = {name.rpartition(".")[0] for name, _ in cuts}
    old_sizes = {p: _sizes(model.get_submodule(p)) for p in touched if isinstance(model.get_submodule(p), layer_types)}
    for (name, dim), idx in cuts.items():
        owner, attr = _owner(model, name)
        tensor = getattr(owner, attr)
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in idx], dtype=torch.long)
        sliced = tensor.detach().index_select(dim, keep).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            owner.register_buffer(attr, sliced, persistent=attr not in owner._non_persistent_buffers_set)
    changed: dict[str, dict[str, Any]] = {}
    for path in sorted(touched):
        attrs = _sync_module(model.get_submodule(path) if path else model)
        if attrs:
            changed[path] = attrs
    for path, (old_in, old_out) in old_sizes.items():
        parent_path = path.rpartition(".")[0]
        attrs = _sync_wrapper(model.get_submodule(parent_path) if parent_path else model, old_in, old_out,
                              _sizes(model.get_submodule(path)))
        if attrs:
            changed.setdefault(parent_path, {}).update(attrs)
    for host, count in heads_removed.items():
        module = model.get_submodule(host)
        attrs = changed.setdefault(host, {})
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, getattr(module, attr) - count)
                attrs[attr] = getattr(module, attr)
        if isinstance(getattr(module, "inner_dim", None), int) and hasattr(module, "to_q"):
            module.inner_dim = attrs["inner_dim"] = module.to_q.out_features
    return changed


def consumer_columns(model: nn.Module, units: Iterable[Unit]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Return (weight, input-column indices) of every layer that reads the units' channels."""
    out = []
    for (name, dim), idx in _merged(units).items():
        owner, attr = _owner(model, name)
        if attr == "weight" and dim == 1 and isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
            out.append((owner.weight, torch.tensor(sorted(idx))))
    return out


@torch.no_grad()
def mask_units(model: nn.Module, units: Iterable[Unit]) -> None:
    """Zero, in place, the columns of every layer that reads a unit's channels (the unit's effect)."""
    for weight, columns in consumer_columns(model, units):
        weight.index_fill_(1, columns, 0.0)


@torch.no_grad()
def check_removal(pruned: nn.Module, masked: nn.Module, inputs: list[dict], atol: float = 1e-5,
                  rtol: float = 1e-4) -> float:
    """Return the largest relative difference between the pruned and the masked model on `inputs`.

    Raises PassError when they differ by more than the tolerances: the removal would change the model.
    """
    worst = 0.0
    for kwargs in inputs:
        try:
            got = output_tensors(pruned(**kwargs))
        except Exception as exc:  # the model's own forward no longer runs: any error type
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            frames = traceback.extract_tb(exc.__traceback__)
            frame = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])  # the model's line
            raise PassError(f"the pruned model's own forward fails at {frame.filename.rsplit('/', 1)[-1]}:"
                            f"{frame.lineno} ({frame.line}): {type(exc).__name__} {first}".rstrip(),
                            "RemoveUnits") from exc
        for a, b in zip(got, output_tensors(masked(**kwargs))):
            diff = float((a - b).abs().max())
            worst = max(worst, diff / max(float(b.abs().max()), 1e-12))
            if not torch.allclose(a, b, atol=atol, rtol=rtol):
                raise PassError(f"the pruned model differs from the masked one by {diff:.3g}", "RemoveUnits")
    return worst
