"""Mutations of small saved artifacts, and the judge of what loading one did; shared by
tests/test_artifact_fuzz.py (200 examples) and benchmarks/fuzz_artifacts.py (5,000).

Two artifacts of one tiny conv + batch-norm + linear model (a plain nn.Sequential, loaded with a
factory): one entropy-coded ('rans'), one fixed-rate ('radix'). Each example copies one, applies one
to three mutations (manifest edits at any depth, bytes of the tensors file flipped, cut or appended,
edits of the safetensors header), loads it with `fxpress.load` while pickle and torch.load raise,
runs what loaded on the recorded example input, and runs `fxpress inspect` on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

import fxpress
from fxpress.errors import FxpressError
from fxpress.ir.artifact import MANIFEST, TENSORS

BAD_NAMES = ["..", "../outside", "/etc/passwd", "a/../../b", "", ".", "0..1", "0.", " ", "\x00", "lowbit::0::codes"]
HUGE = [-1, 0, 1, 2**31, 2**63, -(2**63), 10**30, 1e308, float("inf"), float("nan")]
VERSIONS = [0, 1, 3, "2", 2.0, True, None, -2, 10**12]
DTYPE_NAMES = ["float16", "float32", "bfloat16", "int64", "uint8", "bool", "nn", "Tensor", "float128", ""]
HEADER_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "F8_E4M3", "XYZ", ""]


def tiny_model() -> nn.Module:
    """Return the fuzzed model, seeded: conv + batch norm + two linear layers, in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def example_input() -> torch.Tensor:
    """Return the example input the artifacts were compressed with (batch 2, 3x4x4)."""
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def build_artifacts(folder: Path) -> dict[str, Path]:
    """Save the tiny model at 3 bits (last layer kept in fp16) with each codec; return {codec: artifact path}."""
    paths = {}
    for codec in ("rans", "radix"):
        result = fxpress.compress(tiny_model(), (example_input(),), "uniform", bits=3, grid="balanced",
                                  keep=("6",), codec=codec)
        paths[codec] = folder / codec
        fxpress.save(result, paths[codec], plot=False)
    return paths


@contextlib.contextmanager
def no_pickle():
    """Make every way to unpickle (pickle, torch.load, numpy.load) raise AssertionError inside the block."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle was used to load an artifact")

    class Refusing:
        def __init__(self, *args: Any, **kwargs: Any):
            refuse()

    with mock.patch.object(pickle, "load", refuse), mock.patch.object(pickle, "loads", refuse), \
            mock.patch.object(pickle, "Unpickler", Refusing), mock.patch.object(torch, "load", refuse), \
            mock.patch.object(np, "load", refuse):
        yield


# ---- mutations -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(HUGE) | st.integers(-5, 300)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.sampled_from(BAD_NAMES),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _places(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every JSON path (a tuple of keys and indices) in `value`, the root's children first."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, item in items:
        out.append((*prefix, key))
        out.extend(_places(item, (*prefix, key)))
    return out


def _parent(document: Any, place: tuple) -> Any:
    for key in place[:-1]:
        document = document[key]
    return document


def edit_manifest(data: st.DataObject, manifest: dict[str, Any]) -> str:
    """Apply one drawn edit to `manifest` in place; return what it did."""
    place = data.draw(st.sampled_from(_places(manifest)))
    parent, key = _parent(manifest, place), place[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "targeted", "rename", "version"]))
    if op == "version":
        manifest["format_version"] = data.draw(st.sampled_from(VERSIONS))
        return f"format_version={manifest['format_version']!r}"
    if op == "delete":
        del parent[key]
        return f"delete {place}"
    if op == "rename" and isinstance(parent, dict):
        parent[data.draw(st.sampled_from(BAD_NAMES) | st.text(max_size=6))] = parent.pop(key)
        return f"rename {place}"
    if op == "targeted":
        old = parent[key]
        pool = DTYPE_NAMES if isinstance(old, str) and place[0] == "dtypes" else HUGE + BAD_NAMES
        if isinstance(old, list) and old and all(isinstance(v, int) for v in old):
            pool = [[-v for v in old], [*old, 1], old[::-1], old[:-1], [0] * len(old), [10**9] * len(old)]
        if isinstance(old, int) and not isinstance(old, bool):
            pool = [old + 1, old - 1, -old, 2 * old, 0, 10**18]
        parent[key] = data.draw(st.sampled_from(pool))
        return f"targeted {place}"
    parent[key] = data.draw(json_values)
    return f"replace {place}"


def _split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def edit_header(data: st.DataObject, blob: bytes) -> tuple[bytes, str]:
    """Return the tensors file with one drawn edit of its safetensors header (the data bytes unchanged)."""
    try:
        header, body = _split(blob)
    except (struct.error, ValueError):  # an earlier cut or flip left no readable header: nothing to edit
        return blob, "header unreadable, not edited"
    if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
        return blob, "header empty, not edited"
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    op = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "swap", "metadata"]))
    if op == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(HEADER_DTYPES))
    elif op == "shape":
        numel = int(np.prod(entry["shape"])) if entry["shape"] else 1
        entry["shape"] = data.draw(st.sampled_from([[numel], [1, numel], [numel, 1], entry["shape"][::-1], [],
                                                    [numel * 2], [0], [-1, numel], [numel // 2, 2]]))
    elif op == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = data.draw(st.sampled_from([[start, end - 1], [start + 1, end], [end, start],
                                                           [0, end - start], [start, end + 8], [-1, end]]))
    elif op == "rename":
        header[data.draw(st.sampled_from([*BAD_NAMES, "lowbit::9::codes", "lowbit::4::extra", "6.weight2"]))] = \
            header.pop(name)
    elif op == "delete":
        del header[name]
    elif op == "swap":
        other = data.draw(st.sampled_from(sorted(k for k in header if k not in ("__metadata__", name))))
        header[name], header[other] = header[other], header[name]
    else:
        header["__metadata__"] = data.draw(st.sampled_from([{"format": "pt"}, {"x": 1}, "text", None]))
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body, f"header {op} {name}"


def edit_bytes(data: st.DataObject, blob: bytes) -> tuple[bytes, str]:
    """Return the tensors file with bytes flipped, cut or appended."""
    op = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if not blob:
        op = "append"
    if op == "flip":
        at = data.draw(st.integers(0, len(blob) - 1))
        return blob[:at] + bytes([blob[at] ^ data.draw(st.integers(1, 255))]) + blob[at + 1:], f"flip byte {at}"
    if op == "truncate":
        at = data.draw(st.integers(0, len(blob) - 1))
        return blob[:at], f"truncate to {at}"
    return blob + data.draw(st.binary(min_size=1, max_size=64)), "append bytes"


def mutate(data: st.DataObject, folder: Path) -> list[str]:
    """Apply one to three drawn mutations to the artifact in `folder`; return what each did."""
    manifest = json.loads((folder / MANIFEST).read_text())
    blob = (folder / TENSORS).read_bytes()
    done, reseal = [], False
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["manifest", "header", "bytes"]))
        if kind == "manifest" and isinstance(manifest, dict) and _places(manifest):
            done.append(edit_manifest(data, manifest))
        elif kind == "header":
            blob, what = edit_header(data, blob)
            done.append(what)
            reseal = True  # a header edit with a fresh checksum: the loader's own checks must catch it
        elif kind == "bytes":
            blob, what = edit_bytes(data, blob)
            resealed = data.draw(st.booleans())
            reseal = reseal or resealed
            done.append(what + (" (checksum recomputed)" if resealed else ""))
    if reseal and isinstance(manifest, dict) and isinstance(manifest.get("tensors_file"), dict):
        manifest["tensors_file"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / TENSORS).write_bytes(blob)
    return done


# ---- outcomes --------------------------------------------------------------------------------------------

OK_OUTCOMES = ("loaded, same output", "loaded, output changed")


@dataclass
class Tally:
    """Outcome counts of fuzzed loads and inspects, with the first few failures spelled out."""

    loads: Counter = field(default_factory=Counter)
    inspects: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # mutations that loaded with another output (examples)

    failure_count: int = 0

    def failed(self, what: str, mutations: list[str]) -> None:
        self.failure_count += 1
        if len(self.failures) < 20:
            self.failures.append(f"{what} after {mutations}")


def load_outcome(folder: Path, with_factory: bool, reference: torch.Tensor) -> tuple[str, bool]:
    """Load `folder` and run what loaded; return (outcome, acceptable)."""
    try:
        with no_pickle():
            model = fxpress.load(folder, model=tiny_model if with_factory else None)
    except FxpressError as exc:
        return type(exc).__name__, True
    except Exception as exc:  # noqa: BLE001 - anything but a typed error is what the fuzzer looks for
        return f"untyped {type(exc).__name__}: {str(exc)[:200]}", False
    try:
        with torch.no_grad():
            out = model(example_input())
    except Exception as exc:  # noqa: BLE001
        return f"loaded but does not run: {type(exc).__name__}: {str(exc)[:200]}", False
    return OK_OUTCOMES[0] if torch.equal(out, reference) else OK_OUTCOMES[1], True


def inspect_outcome(folder: Path) -> tuple[str, bool]:
    """Run `fxpress inspect` on `folder`; return (exit status as words, acceptable: 0 or a typed error's 2)."""
    from fxpress.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(["inspect", str(folder)])
        except Exception as exc:  # noqa: BLE001
            return f"inspect raised {type(exc).__name__}", False
    if code == 1:
        return f"inspect: unexpected error {err.getvalue().strip()[:200]}", False
    return f"inspect exit {code}", code in (0, 2)


def run_example(data: st.DataObject, artifacts: dict[str, Path], references: dict[str, torch.Tensor],
                tally: Tally) -> list[str]:
    """Fuzz one example: copy, mutate, load, run, inspect; record outcomes in `tally`; return failures."""
    codec = data.draw(st.sampled_from(sorted(artifacts)))
    with_factory = data.draw(st.sampled_from([True, True, True, False]))
    with tempfile.TemporaryDirectory(prefix="fxpress-fuzz-") as tmp:
        folder = Path(tmp) / "artifact"
        folder.mkdir()
        for name in (MANIFEST, TENSORS):
            shutil.copyfile(artifacts[codec] / name, folder / name)
        mutations = mutate(data, folder)
        before = sorted(os.listdir(folder))
        problems = []
        outcome, fine = load_outcome(folder, with_factory, references[codec])
        tally.loads[outcome.split(":")[0] if not fine else outcome] += 1
        if not fine:
            problems.append(outcome)
        elif outcome == OK_OUTCOMES[1] and len(tally.changed) < 20:
            tally.changed.append(", ".join(mutations))
        outcome, fine = inspect_outcome(folder)
        tally.inspects[outcome if fine else outcome.split(" ")[0] + " failed"] += 1
        if not fine:
            problems.append(outcome)
        if sorted(os.listdir(folder)) != before:
            problems.append(f"loading changed the artifact folder: {before} -> {sorted(os.listdir(folder))}")
    for problem in problems:
        tally.failed(problem, mutations)
    return [f"{p} after {mutations}" for p in problems]


def references(artifacts: dict[str, Path]) -> dict[str, torch.Tensor]:
    """Return each unmutated artifact's output on the example input (what a faithful load reproduces)."""
    with torch.no_grad():
        return {codec: fxpress.load(path, model=tiny_model)(example_input()) for codec, path in artifacts.items()}


def fuzz(artifacts: dict[str, Path], refs: dict[str, torch.Tensor], examples: int, seed: int | None = None,
         stop_on_failure: bool = True) -> Tally:
    """Run `examples` fuzzed examples (derandomized, or from `seed`) and return the tally of outcomes.

    With `stop_on_failure`, the first unacceptable outcome fails (hypothesis then shrinks it to a
    smallest mutation list); without, every failure is counted and the run goes on.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    tally = Tally()

    @settings(max_examples=examples, deadline=None, derandomize=seed is None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        problems = run_example(data, artifacts, refs, tally)
        assert not (stop_on_failure and problems), problems

    (hypothesis_seed(seed)(one) if seed is not None else one)()
    return tally
