"""Step 3 of graft: light heads on cached embeddings, honest evaluation, predict and export.

``from heads import HeadClassifier, fit_head`` imports numpy, scipy, scikit-learn and pandas
only; ONNX, matplotlib and extract are imported where they are used. ``import heads.commands``
(the command line's ``--help``) imports none of them: names here resolve on first use. The search
function is ``heads.search.search`` (``heads.search`` is its module once anything imported it).
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_WHERE = {
    "FeaturePreprocessor": "heads.estimators",
    "HeadClassifier": "heads.estimators",
    "HeadRegressor": "heads.estimators",
    "make_head": "heads.estimators",
    "FitResult": "heads.fit",
    "fit_head": "heads.fit",
    "fit_head_from_cache": "heads.fit",
    "load_head": "heads.persist",
    "read_card": "heads.persist",
    "SearchResult": "heads.search",
    "BUILTIN_TASKS": "heads.tasks",
    "TaskSpec": "heads.tasks",
    "resolve_task": "heads.tasks",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'heads' has no attribute {name!r}")
