"""Caffe's SGD update, per parameter blob, as ``SGDSolver::ApplyUpdate`` does it.

For every blob with ``lr_mult`` > 0, after the backward pass:

    diff     = grad + local_decay · w            (L2; L1 adds local_decay · sign(w))
    history  = momentum · history + local_rate · diff
    w       -= history

with ``local_rate = rate · lr_mult`` and ``local_decay = weight_decay · decay_mult``. Unlike
``torch.optim.SGD`` the rate sits inside the momentum history, so a rate change (step policy)
takes effect gradually, as in Caffe. ``clip_gradients`` > 0 first scales all gradients by
``clip / ‖g‖₂`` when their global L2 norm exceeds it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CaffeSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay in Caffe's form; one param group per Caffe blob.

    Each group carries ``lr_mult`` and ``decay_mult``; :meth:`set_rate` sets every group's
    ``lr`` to ``rate · lr_mult`` before a step. The momentum history is the optimiser state
    (``state_dict``), so a checkpoint resumes it exactly.
    """

    def __init__(self, groups: Iterable[dict], *, momentum: float = 0.9, weight_decay: float = 0.0,
                 regularization: str = "L2", clip_gradients: float = -1.0):
        if regularization not in ("L1", "L2"):
            raise ValueError(f"regularization must be L1 or L2, got {regularization!r}")
        defaults = {"lr": 0.0, "lr_mult": 1.0, "decay_mult": 1.0, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(list(groups), defaults)
        self.regularization = regularization
        self.clip_gradients = clip_gradients

    def set_rate(self, rate: float) -> None:
        """The solver's rate for this iteration (the policy's value); each group scales it."""
        for g in self.param_groups:
            g["lr"] = rate * g["lr_mult"]

    def _clip(self) -> None:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.clip_gradients <= 0 or not grads:
            return
        norm = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads))
        if norm > self.clip_gradients:
            for gr in grads:
                gr.mul_(self.clip_gradients / norm.item())

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._clip()
        for g in self.param_groups:
            local_rate = g["lr"]
            local_decay = g["weight_decay"] * g["decay_mult"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                diff = p.grad
                if local_decay:
                    reg = p if self.regularization == "L2" else torch.sign(p)
                    diff = diff.add(reg, alpha=local_decay)
                state = self.state[p]
                if "history" not in state:
                    state["history"] = torch.zeros_like(p)
                history = state["history"]
                history.mul_(g["momentum"]).add_(diff, alpha=local_rate)
                p.sub_(history)
        return loss
