"""Images and labels for training: records -> labelled rows -> honest split -> augmented batches.

Classification targets are class indices; regression targets the numeric label itself.

Labels and the split are the heads' own (``heads.tasks.prepare``, ``heads.splits.make_split``),
with each image's sha256 as its group, so the same photo filed twice never lands on both sides.
Augmentation is Caffe's data layer: a random crop (when the package preprocessing crops) and a
random mirror, drawn per epoch from ``(seed, epoch)`` alone. The batches are therefore the same
whatever the number of decode threads, and a resumed run sees exactly the images, crops and
flips an uninterrupted one would have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from convert.errors import GraftError
from extract.pipeline import hash_or_reason
from extract.preprocess import ImageError, Preprocess, crop_image
from heads.splits import Split, make_split
from heads.tasks import LabelledData, TaskSpec, prepare


@dataclass
class TrainData:
    """Labelled rows with their target, the split, and what was dropped.

    Classification: ``target`` is the class index (int64) into ``classes``. Regression:
    ``target`` is the numeric label (float64; batches are cast to the net's float32) and ``classes`` is empty.
    """

    meta: pd.DataFrame  # one row per usable image: path, sha256, the label columns
    target: np.ndarray  # class index per row, or the regression value
    classes: list[str]
    split: Split
    dropped: dict[str, int] = field(default_factory=dict)
    kind: str = "classification"

    @property
    def train(self) -> np.ndarray:
        return self.split.train

    @property
    def val(self) -> np.ndarray:
        return self.split.test

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    def class_counts(self, rows: np.ndarray) -> dict[str, int]:
        counts = np.bincount(self.target[rows], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}

    def target_summary(self, rows: np.ndarray) -> dict[str, float]:
        """Regression: count, mean, standard deviation, min and max of the target over ``rows``."""
        t = self.target[rows].astype(np.float64)
        if len(t) == 0:
            return {"n": 0}
        return {"n": int(len(t)), "mean": float(t.mean()), "std": float(t.std()), "min": float(t.min()), "max": float(t.max())}

    def describe(self, rows: np.ndarray) -> str:
        """One phrase for the log: class counts, or the target's mean ± std and range."""
        if self.regression:
            s = self.target_summary(rows)
            return f"mean {s['mean']:.4g} ± {s['std']:.4g}, range {s['min']:.4g}..{s['max']:.4g}" if s["n"] else "empty"
        return "classes " + ", ".join(f"{c} {n}" for c, n in self.class_counts(rows).items())

    def fingerprint(self) -> list[list]:
        """(sha256, target, side) per row, sorted: what the run learns from, for the config hash."""
        side = np.full(len(self.target), "", dtype=object)
        side[self.train], side[self.val] = "train", "val"
        value = float if self.regression else int
        return sorted([s, value(t), str(d)] for s, t, d in zip(self.meta["sha256"], self.target, side) if d)


def _hash_all(paths: Sequence[str], workers: int) -> list[tuple[str | None, str | None]]:
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="graft-hash") as pool:
        return list(pool.map(hash_or_reason, paths, chunksize=16))


def load_data(
    records: pd.DataFrame,
    spec: TaskSpec,
    *,
    where: list[str] | None = None,
    split_column: str | None = "split",
    group_column: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    workers: int = 2,
) -> TrainData:
    """Rows with a label for ``spec`` and a readable file, split into train and validation.

    Regression labels must be numeric (``heads.tasks.prepare`` refuses others, naming the column);
    rows without a label are dropped and counted, as for classification.
    """
    data = prepare(np.zeros((len(records), 0), np.float32), records, spec, where=where)
    hashed = _hash_all(data.meta["path"].astype(str).tolist(), workers)
    ok = np.array([sha is not None for sha, _ in hashed])
    dropped = dict(data.dropped)
    if not ok.all():
        dropped["unreadable_file"] = int((~ok).sum())
        if not ok.any():
            reason = next(r for _, r in hashed)
            raise GraftError(f"none of the {len(ok)} labelled images can be read (e.g. {data.meta['path'].iloc[0]}: {reason})")
    meta = data.meta[ok].reset_index(drop=True)
    meta["sha256"] = [sha for sha, _ in hashed if sha is not None]
    y = data.y[ok]
    if spec.kind == "regression":
        labelled = LabelledData(X=data.X[ok], y=y, meta=meta, spec=spec)
        split = make_split(labelled, split_column=split_column, group_column=group_column, test_size=test_size, seed=seed)
        dropped.update(split.dropped)
        return TrainData(meta=meta, target=y.astype(np.float64), classes=[], split=split, dropped=dropped, kind="regression")
    classes = sorted(set(y.tolist()))
    if len(classes) < 2:
        raise GraftError(f"label {spec.label_column!r} has a single class ({classes[0]!r}) among the readable images: nothing to learn")
    labelled = LabelledData(X=data.X[ok], y=y, meta=meta, spec=spec, classes=classes)
    split = make_split(labelled, split_column=split_column, group_column=group_column, test_size=test_size, seed=seed)
    index = {c: i for i, c in enumerate(classes)}
    target = np.array([index[v] for v in y.tolist()], dtype=np.int64)
    dropped.update(split.dropped)
    return TrainData(meta=meta, target=target, classes=[str(c) for c in classes], split=split, dropped=dropped)


# -- images -----------------------------------------------------------------------------------


def epoch_plan(n: int, seed: int, epoch: int, mirror: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order of the training rows, crop positions (fractions in [0, 1)) and mirror flags of one epoch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    where = rng.random((n, 2))
    flips = rng.random(n) < 0.5 if mirror else np.zeros(n, dtype=bool)
    return order, where, flips


def load_train_image(pp: Preprocess, path: str, where: tuple[float, float], flip: bool) -> np.ndarray:
    """Decode, resize, crop at a random position (``where``: fractions of the slack), preprocess, mirror.

    As Caffe's DataTransformer: the crop offset is uniform over the positions that fit, the mean
    is subtracted before the mirror. With ``where`` = centre and no flip this equals ``pp.load``.
    """
    if pp.crop is None:
        x = pp.load(path)
    else:
        img = np.ascontiguousarray(crop_image(pp.load_pixels(path), pp.crop, where))
        x = pp.normalize(img[None])[0]
    if flip:
        x = np.ascontiguousarray(x[:, ::-1, :] if pp.transpose else x[:, :, ::-1])
    return x


def _safe(load: Callable[[Any], np.ndarray], item: Any, shape: tuple[int, ...] | None) -> np.ndarray | str:
    """The array, or why it could not be had (workers never raise: one bad image is not a dead run)."""
    try:
        x = load(item)
    except ImageError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    if shape is not None and x.shape != shape:
        return f"preprocessed to {x.shape}, the network takes {shape}"
    return x


def iter_batches(
    items: Sequence[Any],
    load: Callable[[Any], np.ndarray],
    batch_size: int,
    *,
    workers: int = 0,
    shape: tuple[int, ...] | None = None,
) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """``(positions, stacked arrays, failures)`` per batch of ``items``, in order.

    Decoding runs up to two batches ahead in ``workers`` threads (OpenCV releases the GIL), so the
    network never waits on JPEG decoding; ``workers=0`` decodes inline. A failed image is left
    out of its batch and reported as ``(position, reason)``.
    """
    def results() -> Iterator[np.ndarray | str]:
        if workers <= 0:
            for it in items:
                yield _safe(load, it, shape)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="graft-decode") as pool:
            queue: deque[Future] = deque()
            pending = iter(items)
            for it in pending:
                queue.append(pool.submit(_safe, load, it, shape))
                if len(queue) >= 2 * batch_size:
                    break
            while queue:
                fut = queue.popleft()
                nxt = next(pending, None)
                if nxt is not None:
                    queue.append(pool.submit(_safe, load, nxt, shape))
                yield fut.result()

    pos: list[int] = []
    arrays: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    for i, r in enumerate(results()):
        if isinstance(r, str):
            failed.append((i, r))
        else:
            pos.append(i)
            arrays.append(r)
        if (i + 1) % batch_size == 0 or i + 1 == len(items):
            yield pos, (np.stack(arrays) if arrays else None), failed
            pos, arrays, failed = [], [], []
