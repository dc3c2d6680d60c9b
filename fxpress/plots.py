"""Plots written next to artifacts (matplotlib, Agg backend)."""

from __future__ import annotations

import io

from fxpress.ir.graph import Graph


def bits_per_layer_png(graph: Graph, title: str) -> bytes:
    """Return a PNG bar chart of log2(levels) per layer in execution order (kept layers at 16, grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    anns = graph.annotations()
    paths = list(anns)
    bits = [anns[p].quant.cost_bits if anns[p].quant else 16.0 for p in paths]
    colors = ["tab:blue" if anns[p].quant else "tab:gray" for p in paths]
    fig, ax = plt.subplots(figsize=(max(8, len(paths) * 0.06), 3.5))
    ax.bar(range(len(paths)), bits, color=colors, width=1.0)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("layer (execution order); grey = kept at 16 bits")
    ax.set_ylabel("bits per weight (log2 levels)")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
