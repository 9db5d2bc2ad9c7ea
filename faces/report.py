"""Contact sheets of a ``graft faces`` run (matplotlib, Agg): a look before training on the crops.

``sheets/photos.png``: a sample of photos with their boxes and landmarks drawn;
``sheets/crops.png``: a grid of crops, as ``extract`` will read them. The sample is spread evenly
over ``faces.csv``, so the same folder gives the same sheets.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import LANDMARK_COLUMNS


def _sample(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n)]


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def contact_sheets(out: str | Path, faces: pd.DataFrame, n: int = 16) -> list[str]:
    """Write the two sheets for ``faces`` (faces.csv's table) under ``out/sheets``; their paths."""
    if faces.empty or n <= 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from extract.preprocess import ImageError, decode

    out = Path(out)
    (out / "sheets").mkdir(exist_ok=True)
    written = []
    photos = _sample(list(dict.fromkeys(faces["photo"])), n)
    fig, axes = _blank_grid(plt, len(photos), 3.0)
    for ax, photo in zip(axes.flat, photos):
        try:
            ax.imshow(decode(photo)[:, :, ::-1])
        except ImageError:
            continue
        for _, f in faces[faces["photo"] == photo].iterrows():
            ax.add_patch(plt.Rectangle((f.x1, f.y1), f.x2 - f.x1, f.y2 - f.y1, fill=False, color="lime", lw=1.5))
            lm = f[LANDMARK_COLUMNS].to_numpy(dtype=float).reshape(-1, 2)
            if not np.isnan(lm).any():
                ax.scatter(lm[:, 0], lm[:, 1], s=8, c="red")
            ax.text(f.x1, f.y1, f"{f.score:.2f}", color="lime", fontsize=7, va="bottom")
        ax.set_title(Path(photo).name[:28], fontsize=7)
    written.append(_save(fig, out / "sheets" / "photos.png"))
    crops = _sample(faces["path"].tolist(), max(n, 4 * n))
    fig, axes = _blank_grid(plt, len(crops), 1.5)
    for ax, rel in zip(axes.flat, crops):
        try:
            ax.imshow(decode(out / rel)[:, :, ::-1])
        except ImageError:
            continue
    written.append(_save(fig, out / "sheets" / "crops.png"))
    return written


def _blank_grid(plt, n: int, inches: float):
    """A figure of ``n`` cells (``inches`` square each) with every axis hidden."""
    rows, cols = _grid(n)
    fig, axes = plt.subplots(rows, cols, figsize=(inches * cols, inches * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return str(path)
