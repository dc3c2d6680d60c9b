"""PNG grids of testbed samples: one row per prompt, optionally several models side by side."""

from __future__ import annotations

import io

import torch


def sample_grid(images: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Return an (H*rows, W*columns, C) image in [0, 1]: the first `columns` samples of each of `rows` prompts."""
    per_row = images.shape[0] // rows
    picked = images.reshape(rows, per_row, *images.shape[1:])[:, :columns]
    r, c, ch, h, w = picked.shape
    grid = picked.permute(0, 3, 1, 4, 2).reshape(r * h, c * w, ch)
    return ((grid + 1) / 2).clamp(0, 1)


def grid_png(panels: dict[str, torch.Tensor], rows: int, columns: int = 8, labels: list[str] | None = None) -> bytes:
    """Return PNG bytes showing each panel's sample grid side by side under its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label_width = 0.055 * max((len(t) for t in labels), default=0) if labels else 0.0
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + label_width + 1.6 * len(panels) * max(columns, 2) / 4,
                                                      0.45 * rows + 1), squeeze=False)
    for i, (ax, (title, images)) in enumerate(zip(axes[0], panels.items())):
        grid = sample_grid(images, rows, columns)
        ax.imshow(grid.squeeze(-1).numpy() if grid.shape[-1] == 1 else grid.numpy(), cmap="gray",
                  interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        height = grid.shape[0] // rows
        ax.set_yticks([height * (r + 0.5) for r in range(rows)] if labels and i == 0 else [])
        if labels and i == 0:  # the prompts once, left of the first panel
            ax.set_yticklabels(labels, fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
