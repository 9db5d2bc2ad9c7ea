"""Step 3 of graft: light heads on cached embeddings, honest evaluation, predict and export.

``from heads import HeadClassifier, fit_head`` imports numpy, scipy, scikit-learn and pandas
only; ONNX, matplotlib and extract are imported where they are used.
"""

from heads.estimators import FeaturePreprocessor, HeadClassifier, HeadRegressor, make_head
from heads.fit import FitResult, fit_head, fit_head_from_cache
from heads.persist import load_head, read_card
from heads.search import SearchResult, search
from heads.tasks import BUILTIN_TASKS, TaskSpec, resolve_task

__all__ = [
    "BUILTIN_TASKS",
    "FeaturePreprocessor",
    "FitResult",
    "HeadClassifier",
    "HeadRegressor",
    "SearchResult",
    "TaskSpec",
    "fit_head",
    "fit_head_from_cache",
    "load_head",
    "make_head",
    "read_card",
    "resolve_task",
    "search",
]
