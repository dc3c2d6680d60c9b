"""Turn a compressed Graph into artifact tensors and manifest payload (entropy-coded weight codes)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fxpress.ir.graph import Graph
from fxpress.ir.input_spec import input_spec
from fxpress.kernels import entropy
from fxpress.kernels.lowbit_layers import LowBitConv2d, LowBitLinear
from fxpress.kernels.packing import pack_radix
from fxpress.kernels.timestep_table import TimestepTable

STORAGE_DTYPE = torch.float16


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """Return `tensor` as fp16 when that is lossless, else unchanged."""
    t = tensor.detach()
    if t.is_floating_point() and t.dtype != STORAGE_DTYPE:
        half = t.to(STORAGE_DTYPE)
        if torch.equal(half.to(t.dtype), t):
            return half
    return t


CODECS = ("rans", "radix")


def lowbit_entry(module: nn.Module, codec: str = "rans") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (manifest entry, tensors) for one low-bit module.

    codec 'rans' entropy-codes the codes (their empirical entropy, at most ~log2(levels) bits each);
    'radix' packs them at a fixed rate of about log2(levels) bits (see packing.radix_plan).
    """
    codes = (module.codes().reshape(-1) + module.offset).numpy().astype(np.int32)
    counts = np.bincount(codes, minlength=module.levels).astype(np.int64)
    if codec == "rans":
        data, counts = entropy.encode(codes, module.levels)
        data = data.view(np.uint8)
    elif codec == "radix":
        data = pack_radix(codes, module.levels)
    else:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    entry: dict[str, Any] = {
        "kind": "linear" if isinstance(module, LowBitLinear) else "conv2d",
        "levels": module.levels, "qmin": -module.offset, "weight_shape": list(module.weight_shape),
        "codec": codec, "coded_bytes": int(data.nbytes), "entropy_bits": entropy.entropy_bits(counts),
    }
    if isinstance(module, LowBitConv2d):
        entry.update(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    tensors = {"codes": torch.from_numpy(data.copy()), "scale": module.scale}
    if codec == "rans":
        tensors["counts"] = torch.from_numpy(counts)
    return entry, tensors


def artifact_contents(graph: Graph, codec: str = "rans") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (payload, tensors) describing the compressed model of `graph` completely."""
    model = graph.module
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    lowbit_names: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, (LowBitLinear, LowBitConv2d)):
            entry, parts = lowbit_entry(module, codec)
            layers[path] = entry
            for key, value in parts.items():
                tensors[f"lowbit::{path}::{key}"] = value
            lowbit_names.update({f"{path}.packed", f"{path}.scale"})
    dtypes = {}
    state = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in state:
        if name in lowbit_names:
            continue
        tensors[name] = _stored(tensor)
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
    tables = [p for p, m in model.named_modules() if isinstance(m, TimestepTable)]
    annotations = {p: a.to_json() for p, a in graph.annotations().items()}
    payload = {"source": graph.source, "lowbit_layers": layers, "dtypes": dtypes,
               "time_cache": graph.extras.get("time_cache") if tables else None,
               "annotations": annotations, "inputs": input_spec(graph.example)}
    if graph.extras.get("structure"):
        payload["structure"] = graph.extras["structure"]  # pruning: blocks bypassed, module sizes changed
    for key in ("wrapper", "sampler", "branches"):  # a guidance input; a distilled model's sampler; adapters
        if graph.extras.get(key):
            payload[key] = graph.extras[key]
    return payload, tensors
