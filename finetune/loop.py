"""One training epoch and one validation pass over batches of preprocessed images.

Training: the rate of each iteration from the Caffe policy, forward to the new layer's output
(the Softmax is for inference), the batch loss, backward, Caffe's SGD update. The loss is
Caffe's: for a classifier the mean cross-entropy (``SoftmaxWithLoss``, VALID normalisation),
for a regressor ``EuclideanLoss`` = sum((prediction - target)^2) / (2 N). Validation: eval mode
(no dropout), the softmax probabilities (classifier) or the raw outputs (regressor).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from convert.errors import GraftError
from finetune.optim import CaffeSGD
from finetune.policies import Schedule, learning_rate

Batches = Iterable[tuple[list[int], "np.ndarray | None", list[tuple[int, str]]]]


@dataclass
class Runtime:
    """Where and how the net runs."""

    device: torch.device
    precision: str  # fp32 | bf16

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        """The net on the device; on CUDA in channels_last with cuDNN autotuning (as extract runs it)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            return net.to(self.device, memory_format=torch.channels_last)
        return net.to(self.device)

    def batch(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" and t.dim() == 4 else t


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # in a log file (no terminal) a line every 10 s, not a carriage return every 0.1 s
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1, leave=False,
                mininterval=0.1 if sys.stderr.isatty() else 10.0)


def _finite(loss: float, iteration: int, rate: float) -> float:
    """The loss, or a GraftError when training has diverged (the last epoch's checkpoint stands)."""
    if not math.isfinite(loss):
        raise GraftError(f"training diverged at iteration {iteration} (loss {loss}, lr {rate:.3g}): lower --lr or the new "
                         f"layer's --lr-mult, or set --clip-gradients, and re-run with --restart")
    return loss


def euclidean_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Caffe's ``EuclideanLoss``: sum((pred - target)^2) / (2 N), N the batch size."""
    diff = pred.reshape(len(pred), -1) - target.reshape(len(target), -1)
    return (diff * diff).sum() / (2 * len(pred))


def train_epoch(
    net: torch.nn.Module,
    opt: CaffeSGD,
    batches: Batches,
    targets: np.ndarray,
    *,
    logits_blob: str,
    schedule: Schedule,
    iteration: int,
    stop_at: int,
    rt: Runtime,
    bar=None,
    regression: bool = False,
) -> tuple[dict, int, list[tuple[int, str]]]:
    """Train on ``batches`` (positions index ``targets``) until they or ``stop_at`` iterations end.

    ``regression``: EuclideanLoss against float targets, stats ``train_loss`` / ``train_rmse``;
    else cross-entropy against class indices, ``train_loss`` / ``train_accuracy``.
    Returns (stats, the next iteration, failures as (position, reason)).
    """
    net.train()
    loss_sum, correct, seen = 0.0, 0, 0
    failed: list[tuple[int, str]] = []
    rate = learning_rate(schedule, iteration)
    t0 = time.perf_counter()
    for pos, x, bad in batches:
        if iteration >= stop_at:
            break
        failed += bad
        if bar is not None:
            bar.update(len(pos) + len(bad))
        if x is None:
            continue
        rate = learning_rate(schedule, iteration)
        opt.set_rate(rate)
        xb = rt.batch(x)
        y = targets[pos].astype(np.float32) if regression else targets[pos]
        yb = torch.from_numpy(y).to(rt.device, non_blocking=True)
        with rt.autocast():
            out = net(xb, blobs=[logits_blob])[logits_blob]
        out = out.float().reshape(len(pos), -1)
        loss = euclidean_loss(out, yb) if regression else F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        iteration += 1
        loss_sum += _finite(float(loss.detach()), iteration, rate) * len(pos)
        seen += len(pos)
        if not regression:
            correct += int((out.detach().argmax(1) == yb).sum())
        if bar is not None:
            shown = {"rmse": f"{math.sqrt(2 * loss_sum / seen):.4g}"} if regression else {"acc": f"{correct / seen:.3f}"}
            bar.set_postfix(loss=f"{loss_sum / seen:.4g}", **shown, lr=f"{rate:.3g}", refresh=False)
    seconds = time.perf_counter() - t0
    n = max(seen, 1)
    # EuclideanLoss is sum of squares / 2N, so RMSE = sqrt(2 * loss)
    metric = {"train_rmse": math.sqrt(2 * loss_sum / n)} if regression else {"train_accuracy": correct / n}
    stats = {"train_loss": loss_sum / n, **metric, "lr": rate,
             "train_images": seen, "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0}
    return stats, iteration, failed


def predict(
    net: torch.nn.Module,
    batches: Batches,
    *,
    logits_blob: str,
    rt: Runtime,
    bar=None,
    softmax: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Softmax probabilities (or, ``softmax=False``, the raw outputs: a regressor's predictions,
    shape (N, 1)) in eval mode, and the positions they belong to; failures apart."""
    net.eval()
    probs, positions, failed = [], [], []
    with torch.inference_mode():
        for pos, x, bad in batches:
            failed += bad
            if bar is not None:
                bar.update(len(pos) + len(bad))
            if x is None:
                continue
            with rt.autocast():
                logits = net(rt.batch(x), blobs=[logits_blob])[logits_blob]
            out = logits.float().reshape(len(pos), -1)
            probs.append((torch.softmax(out, dim=1) if softmax else out).cpu().numpy())
            positions += pos
    proba = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    return proba, np.asarray(positions, dtype=np.int64), failed


def val_stats(proba: np.ndarray, y: np.ndarray, *, regression: bool = False) -> dict:
    """Loss, accuracy and balanced accuracy of probabilities against class indices; for a
    regressor (``proba`` = the outputs, (N, 1)) EuclideanLoss, RMSE, MAE and R²."""
    from sklearn.metrics import balanced_accuracy_score

    if regression:
        return regression_val_stats(proba, y)
    if len(y) == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_balanced_accuracy": float("nan")}
    p = np.clip(proba[np.arange(len(y)), y].astype(np.float64), 1e-12, 1.0)
    pred = proba.argmax(1)
    return {"val_loss": float(-np.log(p).mean()), "val_accuracy": float((pred == y).mean()),
            "val_balanced_accuracy": float(balanced_accuracy_score(y, pred))}


def regression_val_stats(pred: np.ndarray, y: np.ndarray) -> dict:
    """EuclideanLoss (sum of squares / 2N), RMSE, MAE and R² of predictions against targets."""
    if len(y) == 0:
        return {k: float("nan") for k in ("val_loss", "val_rmse", "val_mae", "val_r2")}
    err = pred.reshape(len(y)).astype(np.float64) - y.astype(np.float64)
    sq = float((err * err).mean())
    var = float(((y - y.mean()) ** 2).mean())
    return {"val_loss": sq / 2, "val_rmse": float(np.sqrt(sq)), "val_mae": float(np.abs(err).mean()),
            "val_r2": 1.0 - sq / var if var > 0 and len(y) > 1 else float("nan")}
