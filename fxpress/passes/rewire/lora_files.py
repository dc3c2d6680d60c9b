"""LoRA weights as files other tools read and write: peft's adapter folders and diffusers' LoRA files.

Layouts (module paths are the model's own, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
- "peft": a folder with `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight` and
  `.lora_B.weight`) and `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`);
- "diffusers": one `.safetensors` file with keys `<prefix>.<path>.lora_A.weight` / `.lora_B.weight`
  (prefix `unet`, `transformer` or `text_encoder`, as `save_lora_weights` writes them); the older
  `<path>.lora.down.weight` / `.lora.up.weight` naming is read too. The rank and alpha go in the
  file's metadata.

Reading checks every key: a key that is not a LoRA factor, a factor of a layer the model lacks, or a
layer with one factor but not the other is an error that lists them; nothing is changed then.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fxpress.errors import RecipeError
from fxpress.ir.graph import Graph
from fxpress.passes.rewire.branches import registry
from fxpress.passes.rewire.lora import InsertLoRA

FORMATS = ("peft", "diffusers")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIXES = ("base_model.model.", "unet.", "transformer.", "text_encoder.", "model.")
FACTOR = re.compile(r"(?P<path>.+?)\.(?:(?P<ab>lora_[AB])(?:\.[A-Za-z0-9_]+)?|lora\.(?P<ud>down|up))\.weight")


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def lora_state(graph: Graph, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({path.lora_A.weight / path.lora_B.weight: tensor}, registry entry) of LoRA branch `name`."""
    entry = registry(graph).get(name)
    if entry is None or entry["kind"] != "lora":
        known = ", ".join(map(repr, registry(graph))) or "none"
        raise RecipeError(f"no LoRA branch named {name!r}; the model has {known}")
    if entry.get("fused"):
        raise RecipeError(f"LoRA branch {name!r} is fused into its base weights; unfuse it before saving it")
    tensors = {}
    for path in entry["targets"]:
        wrapper = graph.module.get_submodule(path)
        tensors[f"{path}.lora_A.weight"] = wrapper.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{path}.lora_B.weight"] = wrapper.lora_B.weight.detach().contiguous().cpu()
    return tensors, entry


def save_lora(graph: Graph, name: str, path: str | Path, format: str = "peft", prefix: str = "unet") -> Path:
    """Write LoRA branch `name` of `graph` as a peft adapter folder or a diffusers LoRA file; return the path."""
    if format not in FORMATS:
        raise RecipeError(f"LoRA file format must be one of {FORMATS}, got {format!r}")
    tensors, entry = lora_state(graph, name)
    path = Path(path)
    if format == "peft":
        weights = {f"base_model.model.{k}": v for k, v in tensors.items()}
        config = {"peft_type": "LORA", "r": entry["rank"], "lora_alpha": entry["alpha"],
                  "lora_dropout": entry["dropout"], "target_modules": entry["targets"], "bias": "none",
                  "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
        _write_atomic(path / PEFT_WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        _write_atomic(path / PEFT_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
        return path
    weights = {f"{prefix}.{k}": v for k, v in tensors.items()}
    metadata = {"format": "pt", "fxpress_lora": json.dumps({"rank": entry["rank"], "alpha": entry["alpha"]})}
    _write_atomic(path, lambda tmp: save_file(weights, tmp, metadata=metadata))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, settings: rank / alpha where the file says) of a peft folder or a LoRA .safetensors file."""
    settings: dict[str, Any] = {}
    if path.is_dir():
        config_path, path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except ValueError as exc:
                raise RecipeError(f"{config_path} is not valid JSON: {exc}") from exc
            if config.get("use_dora"):
                raise RecipeError(f"{config_path}: DoRA adapters (use_dora) are not LoRA; fxpress cannot load them")
            if config.get("rank_pattern") or config.get("alpha_pattern"):
                raise RecipeError(f"{config_path}: per-layer ranks or alphas (rank_pattern, alpha_pattern) are not "
                                  "supported; one rank and alpha per adapter")
            rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", config.get("r", 8)))
            if config.get("use_rslora"):  # peft scales rsLoRA by alpha / sqrt(r); fxpress by alpha / r
                alpha = alpha * math.sqrt(rank)
            settings = {"rank": rank, "alpha": alpha, "dropout": float(config.get("lora_dropout", 0.0))}
    if not path.is_file():
        raise RecipeError(f"no LoRA weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            meta = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise RecipeError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "fxpress_lora" in meta and not settings:
        settings = json.loads(meta["fxpress_lora"])
    return tensors, settings


def _strip_prefix(key: str, paths: set[str]) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix) and key[len(prefix):].rsplit(".lora", 1)[0] in paths:
            return key[len(prefix):]
    return key


def read_factors(path: str | Path, layer_paths: set[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """({layer path: {"A": tensor, "B": tensor}}, settings) from a LoRA file, every key checked against the
    model's `layer_paths`; RecipeError lists unknown keys, unknown layers and layers missing a factor."""
    tensors, settings = _read(Path(path))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    unknown, foreign, alphas = [], [], {}
    for key, value in tensors.items():
        plain = _strip_prefix(key, layer_paths)
        if plain.endswith(".alpha") and plain[: -len(".alpha")] in layer_paths:  # kohya-style per-layer alpha
            alphas[plain[: -len(".alpha")]] = float(value)
            continue
        match = FACTOR.fullmatch(plain)
        if match is None:
            unknown.append(key)
            continue
        layer = match["path"]
        if layer not in layer_paths:
            foreign.append(key)
            continue
        part = "A" if match["ab"] == "lora_A" or match["ud"] == "down" else "B"
        factors.setdefault(layer, {})[part] = value
    missing = [f"{p} ({'lora_B' if 'A' in f else 'lora_A'})" for p, f in factors.items() if len(f) != 2]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) that are not LoRA factors: {', '.join(unknown[:5])}")
    if foreign:
        problems.append(f"{len(foreign)} key(s) for layers this model does not have: {', '.join(foreign[:5])}")
    if missing:
        problems.append(f"{len(missing)} layer(s) missing a factor: {', '.join(missing[:5])}")
    if not factors and not problems:
        problems.append("no LoRA factors at all")
    if problems:
        raise RecipeError(f"cannot load the LoRA file {path}: " + "; ".join(problems))
    if alphas:
        values = set(alphas.values())
        if len(values) != 1:
            raise RecipeError(f"{path}: per-layer alphas differ ({sorted(values)[:4]}); one alpha per adapter")
        settings["alpha"] = values.pop()
    return factors, settings


def load_lora(graph: Graph, path: str | Path, name: str = "lora", role: str = "adapter", scale: float = 1.0,
              alpha: float | None = None) -> Graph:
    """Return a new Graph: `graph` plus a LoRA branch `name` holding the factors of a peft folder or a
    diffusers LoRA file (rank from the factors; alpha from the file, else `alpha`, else the rank)."""
    factors, settings = read_factors(path, set(graph.layers))
    ranks = {p: f["A"].shape[0] for p, f in factors.items()}
    if len(set(ranks.values())) != 1:
        raise RecipeError(f"{path}: layers have different ranks ({sorted(set(ranks.values()))}); one rank per adapter")
    rank = next(iter(ranks.values()))
    alpha = settings.get("alpha", alpha if alpha is not None else rank)
    targets = [f"re:{re.escape(p)}" for p in factors]
    work = graph.copy()
    result = InsertLoRA(targets, rank=rank, alpha=alpha, dropout=settings.get("dropout", 0.0), name=name,
                        role=role, scale=scale).run(work)
    new = result.graph
    with torch.no_grad():
        for layer, pair in factors.items():
            wrapper = new.module.get_submodule(layer)
            for part, module in (("A", wrapper.lora_A), ("B", wrapper.lora_B)):
                value = pair[part]
                if value.numel() != module.weight.numel():
                    raise RecipeError(f"{path}: {layer}'s lora_{part} has shape {tuple(value.shape)}, the layer "
                                      f"needs {tuple(module.weight.shape)}")
                module.weight.copy_(value.reshape(module.weight.shape).to(module.weight.dtype))
    return new
