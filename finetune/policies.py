"""Caffe's learning-rate policies: the rate at iteration ``it`` (0-based, before the update).

One small function per ``lr_policy``, transcribed from ``SGDSolver::GetLearningRate`` in Caffe's
``sgd_solver.cpp``, registered by name in :data:`LR_POLICIES`. Each states which solver fields it
needs; :func:`check_schedule` refuses a schedule that lacks one instead of letting Caffe's proto
default (0) silently zero the rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from convert.errors import GraftError


@dataclass(frozen=True)
class Schedule:
    """The solver fields a policy reads (Caffe's names); ``None`` = not set."""

    base_lr: float
    lr_policy: str = "fixed"
    gamma: float | None = None
    power: float | None = None
    stepsize: int | None = None
    stepvalue: tuple[int, ...] = ()
    max_iter: int | None = None


Policy = Callable[[Schedule, int], float]

#: lr_policy name -> (rate function, the fields it needs)
LR_POLICIES: dict[str, tuple[Policy, tuple[str, ...]]] = {}


def policy(name: str, needs: tuple[str, ...] = ()) -> Callable[[Policy], Policy]:
    """Register a rate function under Caffe's ``lr_policy`` name."""

    def add(fn: Policy) -> Policy:
        if name in LR_POLICIES:
            raise RuntimeError(f"lr_policy {name!r} registered twice")
        LR_POLICIES[name] = (fn, needs)
        return fn

    return add


@policy("fixed")
def fixed(s: Schedule, it: int) -> float:
    return s.base_lr


@policy("step", ("gamma", "stepsize"))
def step(s: Schedule, it: int) -> float:
    """base_lr · gamma ^ floor(iter / stepsize)"""
    return s.base_lr * s.gamma ** (it // s.stepsize)


@policy("multistep", ("gamma", "stepvalue"))
def multistep(s: Schedule, it: int) -> float:
    """base_lr · gamma ^ (number of stepvalues reached); Caffe counts them up as iter passes each."""
    return s.base_lr * s.gamma ** sum(1 for v in s.stepvalue if it >= v)


@policy("exp", ("gamma",))
def exp(s: Schedule, it: int) -> float:
    """base_lr · gamma ^ iter"""
    return s.base_lr * s.gamma**it


@policy("inv", ("gamma", "power"))
def inv(s: Schedule, it: int) -> float:
    """base_lr · (1 + gamma · iter) ^ (−power)"""
    return s.base_lr * (1.0 + s.gamma * it) ** (-s.power)


@policy("poly", ("power", "max_iter"))
def poly(s: Schedule, it: int) -> float:
    """base_lr · (1 − iter / max_iter) ^ power"""
    return s.base_lr * (1.0 - it / s.max_iter) ** s.power


@policy("sigmoid", ("gamma", "stepsize"))
def sigmoid(s: Schedule, it: int) -> float:
    """base_lr · 1 / (1 + exp(−gamma · (iter − stepsize)))"""
    return s.base_lr * (1.0 / (1.0 + math.exp(-s.gamma * (it - s.stepsize))))


def check_schedule(s: Schedule, where: str = "lr policy") -> Schedule:
    """The schedule if its policy is known and has every field it needs; else one clear error."""
    if s.lr_policy not in LR_POLICIES:
        raise GraftError(f"{where}: unknown lr_policy {s.lr_policy!r} (known: {', '.join(LR_POLICIES)})")
    if not s.base_lr > 0:
        raise GraftError(f"{where}: base_lr must be positive, got {s.base_lr}")
    _, needs = LR_POLICIES[s.lr_policy]
    missing = [f for f in needs if getattr(s, f) in (None, ())]
    if missing:
        raise GraftError(f"{where}: lr_policy {s.lr_policy!r} needs {' and '.join(missing)} "
                         f"(flags --{' --'.join(m.replace('_', '-') for m in missing)} or the solver file)")
    if "stepsize" in needs and s.stepsize <= 0:
        raise GraftError(f"{where}: stepsize must be positive, got {s.stepsize}")
    if s.stepvalue and any(b <= a for a, b in zip(s.stepvalue, s.stepvalue[1:])):
        raise GraftError(f"{where}: stepvalue must increase, got {list(s.stepvalue)}")
    if s.lr_policy == "poly" and s.max_iter <= 0:
        raise GraftError(f"{where}: max_iter must be positive, got {s.max_iter}")
    return s


def learning_rate(s: Schedule, it: int) -> float:
    """Caffe's rate at iteration ``it`` under ``s.lr_policy``."""
    return LR_POLICIES[s.lr_policy][0](s, it)
