"""Run one `fxpress` command in one process and under `torchrun --nproc_per_node=2`, for the tests that
check a training pass gives the same result on two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def one_and_two_processes(cli_args: list[str], folder: Path, script: bool = False) -> tuple[Path, Path]:
    """Run `python -m fxpress.cli *cli_args --out folder/one` (with `script`: `python *cli_args`, the first
    being a script path relative to the repository), then the same under torchrun with 2 processes into
    folder/two (1 thread each, quiet); assert both succeed and return the two output folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FXPRESS_QUIET": "1"}
    root = Path(__file__).resolve().parents[1]
    args = [str(root / cli_args[0]), *cli_args[1:]] if script else ["-m", "fxpress.cli", *cli_args]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, out in (([sys.executable, *args], "one"), ([*launch, *args], "two")):
        done = subprocess.run([*command, "--out", str(folder / out)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return folder / "one", folder / "two"
