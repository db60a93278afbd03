"""PNG figures: matplotlib without a display, written atomically like every output.

Run plots (metrics.png), the comparison plot and ``inspect --plot`` all go through
these two functions, so matplotlib is imported only when a figure is made.
"""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_path


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """``(figure, pyplot)`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, plt


def save_png(fig, plt, path: str | os.PathLike) -> Path:
    """Lay out, write ``path`` atomically, and free the figure."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
