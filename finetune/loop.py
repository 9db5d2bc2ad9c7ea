"""One training epoch and one validation pass over batches of preprocessed images.

Training: the rate of each iteration from the Caffe policy, forward to the new layer's logits
(the Softmax is for inference), mean cross-entropy over the batch (Caffe's SoftmaxWithLoss with
VALID normalisation), backward, Caffe's SGD update. Validation: eval mode (no dropout), the
softmax probabilities and the per-image loss.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
) -> tuple[dict, int, list[tuple[int, str]]]:
    """Train on ``batches`` (positions index ``targets``) until they or ``stop_at`` iterations end.

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
        yb = torch.from_numpy(targets[pos]).to(rt.device, non_blocking=True)
        with rt.autocast():
            logits = net(xb, blobs=[logits_blob])[logits_blob]
        logits = logits.float().reshape(len(pos), -1)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        iteration += 1
        loss_sum += float(loss.detach()) * len(pos)
        correct += int((logits.detach().argmax(1) == yb).sum())
        seen += len(pos)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", lr=f"{rate:.3g}", refresh=False)
    seconds = time.perf_counter() - t0
    stats = {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1), "lr": rate,
             "train_images": seen, "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0}
    return stats, iteration, failed


def predict(
    net: torch.nn.Module,
    batches: Batches,
    *,
    logits_blob: str,
    rt: Runtime,
    bar=None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Softmax probabilities (eval mode) and the positions they belong to; failures apart."""
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
            probs.append(torch.softmax(logits.float().reshape(len(pos), -1), dim=1).cpu().numpy())
            positions += pos
    proba = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    return proba, np.asarray(positions, dtype=np.int64), failed


def val_stats(proba: np.ndarray, y: np.ndarray) -> dict:
    """Loss, accuracy and balanced accuracy of probabilities against class indices."""
    from sklearn.metrics import balanced_accuracy_score

    if len(y) == 0:
        return {"val_loss": float("nan"), "val_accuracy": float("nan"), "val_balanced_accuracy": float("nan")}
    p = np.clip(proba[np.arange(len(y)), y].astype(np.float64), 1e-12, 1.0)
    pred = proba.argmax(1)
    return {"val_loss": float(-np.log(p).mean()), "val_accuracy": float((pred == y).mean()),
            "val_balanced_accuracy": float(balanced_accuracy_score(y, pred))}
