"""Step 2 of graft: cached embeddings of any named blob of a converted model.

``from extract import load_embeddings`` (or ``iter_embeddings``, its streaming form for caches
larger than memory) imports only numpy, pandas and pyarrow (no torch, no ``convert``), so
analysis scripts and heads can read caches anywhere. ``import extract.commands`` (the command
line's ``--help``) imports none of them: names here resolve on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CacheError", "iter_embeddings", "list_datasets", "list_keys", "load_embeddings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from extract import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'extract' has no attribute {name!r}")
