"""What fxpress prints: one quiet switch, the stderr console, progress bars, and third-party noise kept out.

`FXPRESS_QUIET=1` (the CLI's `--quiet` sets it) silences progress bars, training bars and the pipeline's
per-pass log lines alike; errors and the final report still print. Importing diffusers with torchao
installed (executorch brings it) logs torchao's optional-extension and deprecation messages that no
fxpress user can act on; `quiet_third_party()` drops exactly those records at the loggers that emit
them, leaving every other warning of those libraries untouched. `third_party_warnings_off()` does the
same for the Python warnings in THIRD_PARTY_WARNINGS, around the one fxpress call that triggers each.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# (logger name, message prefix) of the records dropped; each comes from an import, none from fxpress's use.
THIRD_PARTY_NOISE: tuple[tuple[str, str], ...] = (
    ("torchao", "Failed to load "),  # prebuilt kernels for other Python/CUDA builds (mxfp8, cutlass)
    ("torch.utils._pytree", "%s is an Enum subclass"),  # torchao registers Enums the deprecated way
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    # the ONNX exporter lists torchvision's ops it skips, once per export, though no model here uses them
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
)

# (category, message pattern) of Python warnings torch raises from inside its own code, dropped only around
# the fxpress calls that trigger them.
THIRD_PARTY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch >= 2.13: torch.onnx's decomposition deep-copies the exported graph, and copying its pytree
    # specs warns about torch's own use of the deprecated LeafSpec
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\)"),
)


def quiet() -> bool:
    """Return True when progress and log lines are switched off (FXPRESS_QUIET set and not '0')."""
    return os.environ.get("FXPRESS_QUIET", "") not in ("", "0")


def set_quiet(value: bool = True) -> None:
    """Switch fxpress's progress bars and log lines off (or on) for this process and its children."""
    os.environ["FXPRESS_QUIET"] = "1" if value else "0"


def stderr_console() -> Console:
    """Return a console on stderr that prints nothing while quiet() is True."""
    return Console(stderr=True, quiet=quiet())


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party() -> None:
    """Install, once, filters that drop the THIRD_PARTY_NOISE records at their own loggers."""
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in THIRD_PARTY_NOISE:
        by_logger[name] = (*by_logger.get(name, ()), prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


@contextmanager
def third_party_warnings_off() -> Iterator[None]:
    """Within the block, drop the THIRD_PARTY_WARNINGS (every other warning still shows)."""
    with warnings.catch_warnings():
        for category, pattern in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        yield


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """Within the block, transformers' and diffusers' own progress bars (e.g. "Writing model shards" while
    `save_pretrained` writes) stay hidden; each is switched back on afterwards if it was on."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    switched = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled()]
    for module in switched:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in switched:
            module.enable_progress_bar()


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, description=None)` driving a progress bar of `total` steps with an estimate."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=quiet()) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
