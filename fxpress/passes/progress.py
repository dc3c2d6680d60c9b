"""Progress bars for long passes: see fxpress.output (one quiet switch for bars and log lines)."""

from fxpress.output import progress_bar

__all__ = ["progress_bar"]
