"""What fxpress prints: no other library's import noise, and one quiet switch for bars and log lines."""

from __future__ import annotations

import logging
import subprocess
import sys

from fxpress.output import THIRD_PARTY_NOISE, progress_bar, quiet, quiet_third_party, set_quiet


def test_importing_diffusers_after_fxpress_is_silent():
    """torchao (brought by executorch) logs optional-kernel and deprecation noise when diffusers imports it."""
    code = "import fxpress\nfrom diffusers import UNet2DConditionModel\nimport transformers\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""


def test_only_the_named_records_are_dropped(caplog):
    quiet_third_party()
    quiet_third_party()  # idempotent: one filter per logger
    for name, prefix in THIRD_PARTY_NOISE:
        logger = logging.getLogger(name)
        assert len(logger.filters) >= 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            logger.warning(prefix + " something")
            logger.warning("a real problem")
        assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_one_switch_for_bars_and_log_lines(monkeypatch, capsys):
    monkeypatch.setenv("FXPRESS_QUIET", "0")
    assert not quiet()
    set_quiet()
    assert quiet()
    with progress_bar("measuring", 3) as advance:
        advance()
        advance(2, description="measuring: done")
    assert capsys.readouterr().err == ""
    set_quiet(False)
    assert not quiet()
