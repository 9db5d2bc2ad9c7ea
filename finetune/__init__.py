"""Step 4 of graft: fine-tune a converted Caffe net end to end with Caffe's solver semantics; the
result is a new model package (and a caffemodel Caffe itself loads).

Modules, one job each: ``data`` (labels, split, augmented batches), ``surgery`` (cut the
prototxt, append a classifier or a one-output regressor), ``multipliers`` (lr_mult / decay_mult, --freeze), ``policies``
(Caffe's lr policies), ``solver`` (solver.prototxt and flags), ``optim`` (Caffe's SGD update),
``loop`` (an epoch, a validation pass), ``checkpoint`` (the resumable run folder), ``export``
(caffemodel + convert), ``report``; :func:`finetune.train.finetune` ties them together.

``from finetune import finetune`` imports torch; the command line imports it only when run.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FinetuneResult", "finetune"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from finetune import train

        return getattr(train, name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
