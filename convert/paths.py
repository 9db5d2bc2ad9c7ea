"""Where graft writes by default: everything under one root, ``$GRAFT_ARTIFACTS`` or ``artifacts/``.

Read at call time, not import time, so setting the variable in a script (or a test) after
importing graft still moves models, caches, heads and fine-tuning runs together.
"""

from __future__ import annotations

import os
from pathlib import Path


def artifacts_root() -> Path:
    """``$GRAFT_ARTIFACTS``, else ``artifacts`` under the current directory."""
    return Path(os.environ.get("GRAFT_ARTIFACTS") or "artifacts")


def models_root() -> Path:
    """Converted and fine-tuned model packages: ``<root>/models/<name>``."""
    return artifacts_root() / "models"


def caches_root() -> Path:
    """Embedding caches: ``<root>/cache/<model name>``."""
    return artifacts_root() / "cache"


def heads_root() -> Path:
    """Fitted heads: ``<root>/heads/<task>-<model>-<layer>``."""
    return artifacts_root() / "heads"


def runs_root() -> Path:
    """Fine-tuning runs (checkpoints, reports): ``<root>/finetune/<name>``."""
    return artifacts_root() / "finetune"
