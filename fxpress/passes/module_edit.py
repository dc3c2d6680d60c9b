"""Helpers for passes that edit modules: where the timestep input is; replacing submodules."""

from __future__ import annotations

from fxpress.ir.module_paths import replace_submodule

__all__ = ["replace_submodule", "timestep_input"]


def timestep_input(graph_input_names: list[str], preferred: str | None = None) -> str | None:
    """Return the model input that carries the diffusion timestep, if any."""
    if preferred:
        return preferred if preferred in graph_input_names else None
    return next((n for n in graph_input_names if n in ("timestep", "timesteps", "t")), None)
