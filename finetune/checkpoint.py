"""The run folder ``artifacts/finetune/<name>/``: its configuration and a checkpoint per epoch.

``config.json`` holds everything that decides the trained weights (base model, net surgery,
multipliers, data fingerprint, solver, batch size, seed, ...). Re-running the same command finds
the same configuration and resumes after the last complete epoch; a different configuration in
the same folder is refused with the fields that differ, because continuing it would train a
mixture of two runs. ``checkpoint.pt`` (weights, optimiser state, epoch, iteration, history, RNG
state) is written to a temporary file and renamed into place, so a kill mid-write leaves the
previous epoch's checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from convert.errors import GraftError

FORMAT = "graft-finetune/1"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def open_run(run_dir: Path, config: dict[str, Any], *, restart: bool = False) -> dict | None:
    """Claim ``run_dir`` for ``config``; the last checkpoint to resume from, or None to start.

    Raises GraftError when the folder holds a run of another configuration (unless ``restart``,
    which discards its config and checkpoint).
    """
    run_dir = Path(run_dir)
    config = json.loads(json.dumps(config))  # tuples -> lists, as read back
    cfg_path = run_dir / CONFIG
    if restart:  # only the run's own state: the folder may hold other things
        for f in (CHECKPOINT, CONFIG):
            (run_dir / f).unlink(missing_ok=True)
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old != config:
            diff = _differences(old, config)
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise GraftError(f"{run_dir} holds a fine-tuning run with another configuration (differs in: {shown}); "
                             f"re-run with --restart to discard it, or give another --name")
        return load_checkpoint(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(cfg_path, lambda p: p.write_text(json.dumps(config, indent=1, sort_keys=True) + "\n"))
    return None


def load_checkpoint(run_dir: Path, config: dict[str, Any]) -> dict | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (a damaged file: say so, never train on it)
        raise GraftError(f"{path}: unreadable checkpoint ({type(err).__name__}); re-run with --restart") from None
    if state.get("format") != FORMAT or state.get("config_hash") != config_hash(config):
        raise GraftError(f"{path}: checkpoint does not belong to {run_dir / CONFIG}; re-run with --restart")
    return state


def save_checkpoint(run_dir: Path, config: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus format and config hash) as the folder's checkpoint, atomically."""
    path = Path(run_dir) / CHECKPOINT
    full = {"format": FORMAT, "config_hash": config_hash(config), **state}
    _atomic_write(path, lambda p: torch.save(full, p))
    return path
