"""The optimisation settings: built-in defaults, then a Caffe ``solver.prototxt``, then flags.

A solver file is parsed with Caffe's own ``SolverParameter`` message (``convert.proto``). Fields
graft honours: base_lr, lr_policy, gamma, power, stepsize, stepvalue, max_iter, momentum,
weight_decay, regularization_type (L2/L1), clip_gradients, random_seed. Fields about Caffe's own
data, test and snapshot machinery (net, test_iter, display, snapshot, solver_mode, ...) are
reported and ignored: graft brings its own. Anything that would change the optimisation in a way
graft does not reproduce (a solver type other than SGD, iter_size > 1) is refused, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import GraftError
from convert.parse import read_text_message
from convert.proto import pb
from finetune.policies import Schedule, check_schedule

#: Caffe's solver fields that concern its data/test/snapshot loop, which graft replaces
IGNORED_FIELDS = ("net", "net_param", "train_net", "test_net", "test_iter", "test_interval", "display", "average_loss",
                  "snapshot", "snapshot_prefix", "solver_mode", "device_id", "delta", "momentum2", "rms_decay")
SCHEDULE_FIELDS = ("base_lr", "lr_policy", "gamma", "power", "stepsize", "stepvalue", "max_iter")
DEFAULTS: dict[str, Any] = {"base_lr": 0.001, "lr_policy": "fixed", "momentum": 0.9, "weight_decay": 0.0005,
                            "regularization_type": "L2", "clip_gradients": -1.0}


@dataclass(frozen=True)
class Solver:
    """Everything the optimiser and the schedule need, with where it came from."""

    schedule: Schedule
    momentum: float = 0.9
    weight_decay: float = 0.0005
    regularization: str = "L2"
    clip_gradients: float = -1.0
    seed: int | None = None
    source: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def as_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {"base_lr": s.base_lr, "lr_policy": s.lr_policy, "gamma": s.gamma, "power": s.power, "stepsize": s.stepsize,
                "stepvalue": list(s.stepvalue), "max_iter": s.max_iter, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "regularization_type": self.regularization,
                "clip_gradients": self.clip_gradients}


def _top_level_fields(text: str) -> list[str]:
    """Names of the top-level fields of a text-format message (to report the unknown ones)."""
    names, depth = [], 0
    for line in text.splitlines():
        line = re.sub(r"#.*", "", line)
        if depth == 0:
            m = re.match(r"\s*([A-Za-z_]\w*)\s*[:{]", line)
            if m:
                names.append(m.group(1))
        depth += line.count("{") - line.count("}")
    return names


def read_solver(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The fields a solver file sets (``{name: value}``) and notes on what is ignored.

    Raises GraftError naming the file for a missing file, a syntax error, or a setting graft
    cannot honour.
    """
    path = Path(path)
    msg = pb.SolverParameter()
    text = read_text_message(path, msg, label="--solver ", expected="a solver.prototxt")
    known = pb.SolverParameter.DESCRIPTOR.fields_by_name
    notes = []
    unknown = sorted({f for f in _top_level_fields(text) if f not in known})
    if unknown:
        notes.append(f"solver fields graft does not know, ignored: {', '.join(unknown)}")
    ignored = [fd.name for fd, _ in msg.ListFields() if fd.name in IGNORED_FIELDS]
    if ignored:
        notes.append(f"solver fields ignored (graft runs its own data, validation and checkpoints): {', '.join(ignored)}")
    if msg.type.upper() != "SGD" or msg.solver_type != pb.SolverParameter.SGD:
        kind = msg.type if msg.type.upper() != "SGD" else pb.SolverParameter.SolverType.Name(msg.solver_type)
        raise GraftError(f"--solver {path}: solver type {kind} is not supported (only SGD with momentum)")
    if msg.iter_size != 1:
        raise GraftError(f"--solver {path}: iter_size {msg.iter_size} is not supported; use --batch-size for the effective batch")
    if msg.regularization_type not in ("L1", "L2"):
        raise GraftError(f"--solver {path}: regularization_type must be L1 or L2, got {msg.regularization_type!r}")
    values: dict[str, Any] = {}
    for name in (*SCHEDULE_FIELDS, "momentum", "weight_decay", "regularization_type", "clip_gradients"):
        if name == "stepvalue":  # the one repeated field
            if len(msg.stepvalue):
                values[name] = tuple(int(v) for v in msg.stepvalue)
        elif msg.HasField(name):
            v = getattr(msg, name)
            # proto floats are 32-bit: 0.01 reads back as 0.009999999776; keep the number as written
            values[name] = float(str(np.float32(v))) if isinstance(v, float) else v
    if msg.HasField("random_seed") and msg.random_seed >= 0:
        values["random_seed"] = int(msg.random_seed)
    return values, notes


def build_solver(solver_file: str | Path | None = None, **flags: Any) -> Solver:
    """Defaults, overridden by the solver file, overridden by the flags that are not ``None``.

    ``flags`` use Caffe's field names (``base_lr``, ``lr_policy``, ``stepvalue``, ...) plus
    ``random_seed``. ``max_iter`` may stay unset: the caller then knows the total iterations.
    """
    values = dict(DEFAULTS)
    notes: list[str] = []
    where = "lr policy"
    if solver_file is not None:
        from_file, notes = read_solver(solver_file)
        values.update(from_file)
        where = f"--solver {solver_file}"
    unknown = set(flags) - set(SCHEDULE_FIELDS) - set(DEFAULTS) - {"random_seed"}
    if unknown:
        raise TypeError(f"unknown solver settings: {sorted(unknown)}")
    values.update({k: v for k, v in flags.items() if v is not None})
    schedule = Schedule(
        base_lr=float(values["base_lr"]), lr_policy=str(values["lr_policy"]),
        gamma=_opt(values.get("gamma"), float), power=_opt(values.get("power"), float),
        stepsize=_opt(values.get("stepsize"), int), stepvalue=tuple(int(v) for v in values.get("stepvalue", ())),
        max_iter=_opt(values.get("max_iter"), int),
    )
    if values["regularization_type"] not in ("L1", "L2"):
        raise GraftError(f"{where}: regularization_type must be L1 or L2, got {values['regularization_type']!r}")
    for name in ("momentum", "weight_decay"):
        if not values[name] >= 0:
            raise GraftError(f"{where}: {name} must be >= 0, got {values[name]}")
    if schedule.lr_policy != "poly":  # poly's max_iter may come from the epochs; checked by with_max_iter
        check_schedule(replace(schedule, max_iter=schedule.max_iter or 1), where)
    return Solver(schedule=schedule, momentum=float(values["momentum"]), weight_decay=float(values["weight_decay"]),
                  regularization=str(values["regularization_type"]), clip_gradients=float(values["clip_gradients"]),
                  seed=values.get("random_seed"), source=str(solver_file) if solver_file is not None else None,
                  notes=tuple(notes))


def with_max_iter(solver: Solver, total_iters: int) -> Solver:
    """The solver with ``max_iter`` defaulted to the run's total iterations, checked in full."""
    s = solver.schedule
    if s.max_iter is None:
        s = replace(s, max_iter=total_iters)
    if s.lr_policy == "poly" and s.max_iter < total_iters:
        raise GraftError(f"lr_policy poly: max_iter {s.max_iter} is below the run's {total_iters} iterations "
                         f"(the rate would pass zero); raise max_iter or lower --epochs")
    where = f"--solver {solver.source}" if solver.source else "lr policy"
    return replace(solver, schedule=check_schedule(s, where))


def _opt(v: Any, cast: type) -> Any:
    return None if v is None else cast(v)
