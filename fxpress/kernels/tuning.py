"""Pick the fastest kernel choice per problem shape by timing a short list, and remember it on disk.

A choice is ("fused", KernelConfig) for our tensor-core kernel, ("gemv", KernelConfig) for the few-row
CUDA-core kernel, or ("dequant", None) for dequantize + cuBLAS/cuDNN.
The first candidate of each list is the default used where nothing can be timed: in the CPU
interpreter, while a CUDA graph is being captured, or with FXPRESS_TUNE=0. Choices persist in
$FXPRESS_CACHE_DIR (default ~/.cache/fxpress)/triton_tuning.json, so a second process starts warm.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fxpress.kernels.kernel_config import KernelConfig, interpreting


@dataclass(frozen=True)
class Choice:
    """How one problem shape runs: our fused kernel with a config, or dequantize + a dense library."""

    path: str
    config: KernelConfig | None = None

    def to_json(self) -> dict:
        """Return a JSON-ready dict."""
        return {"path": self.path, "config": None if self.config is None else self.config.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        """Rebuild a choice written by to_json."""
        config = data.get("config")
        return cls(str(data["path"]), None if config is None else KernelConfig.from_json(config))


DEQUANT = Choice("dequant")


def cache_path() -> Path:
    """Return the tuning cache file."""
    root = Path(os.environ.get("FXPRESS_CACHE_DIR", Path.home() / ".cache" / "fxpress"))
    return root / "triton_tuning.json"


def tuning_enabled() -> bool:
    """True unless FXPRESS_TUNE=0 or the kernels run in the interpreter."""
    return os.environ.get("FXPRESS_TUNE", "1") != "0" and not interpreting()


class Tuner:
    """Choice per shape key: remembered in memory and on disk, measured once where possible."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._choices: dict[str, Choice] | None = None
        self.timings: dict[str, dict[str, float]] = {}
        self.last: tuple[str | tuple, Choice] | None = None   # the most recent (key, choice), for reports
        self._fast: dict[tuple, Choice] = {}
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Choice]:
        if self._choices is None:
            self._choices = {}
            path = self.path or cache_path()
            try:
                data = json.loads(path.read_text())
                self._choices = {k: Choice.from_json(v) for k, v in data.items()}
            except (OSError, ValueError, TypeError, KeyError):
                pass  # a missing or unreadable cache only means tuning again
        return self._choices

    def _save(self) -> None:
        path = self.path or cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump({k: v.to_json() for k, v in sorted(self._load().items())}, f, indent=1)
            os.replace(f.name, path)
        except OSError:
            pass  # a read-only home directory only costs re-tuning in the next process

    def choose(self, key: str, candidates: Sequence[Choice], run: Callable[[Choice], object]) -> Choice:
        """Return the cached choice for `key`, else time `candidates` (where allowed) and keep the fastest."""
        with self._lock:
            known = self._load().get(key)
        if known is None and (not tuning_enabled() or
                              (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
            known = candidates[0]
        if known is not None:
            self.last = (key, known)
            return known
        times: dict[str, float] = {}
        best, best_ms = candidates[0], float("inf")
        for candidate in candidates:
            try:
                ms = gpu_time_ms(lambda c=candidate: run(c))
            except Exception:  # noqa: BLE001 - a config that does not compile or fit is simply not a candidate
                continue
            times[_label(candidate)] = ms * 1e3
            if ms < best_ms:
                best, best_ms = candidate, ms
        with self._lock:
            self._load()[key] = best
            self.timings[key] = times
            self._save()
        self.last = (key, best)
        return best

    def fast(self, key: tuple) -> Choice | None:
        """Return the choice remembered under a cheap tuple key (the eager hot path), or None."""
        choice = self._fast.get(key)
        if choice is not None:
            self.last = (key, choice)
        return choice

    def remember_fast(self, key: tuple, choice: Choice) -> None:
        """Remember `choice` under a cheap tuple key, unless a CUDA graph is being captured."""
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self._fast[key] = choice

    def forget(self) -> None:
        """Drop every remembered choice (memory and disk)."""
        with self._lock:
            self._choices = {}
            self._fast.clear()
            self.timings.clear()
            self._save()


SLEEP_CYCLES = 4_000_000  # ~2 ms at 2 GHz: longer than queueing ten calls from Python


def gpu_time_ms(fn: Callable[[], object], calls: int = 10, rounds: int = 3) -> float:
    """GPU time of one fn() in ms, without Python launch overhead, in a few milliseconds.

    A sleep kernel keeps the GPU busy while `calls` calls are queued behind it, so the events around
    them time the GPU running them back to back (a CUDA graph per candidate costs ~0.3 s instead).
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(rounds):
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def describe(choice: Choice) -> str:
    """Return a short label: 'dequant', or the path and 'BMxBNxBK/s<split>/w<warps>/st<stages>'."""
    return choice.path if choice.config is None else f"{choice.path} {_config_label(choice.config)}"


def _label(choice: Choice) -> str:
    """The key of a candidate in Tuner.timings: the fused kernel's config alone, other paths prefixed."""
    if choice.config is None:
        return choice.path
    prefix = "" if choice.path == "fused" else f"{choice.path} "
    return prefix + _config_label(choice.config)


def _config_label(c: KernelConfig) -> str:
    return f"{c.block_m}x{c.block_n}x{c.block_k}/s{c.split_k}/w{c.num_warps}/st{c.num_stages}"


TUNER = Tuner()
