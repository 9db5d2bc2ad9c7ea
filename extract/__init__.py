"""Step 2 of graft: cached embeddings of any named blob of a converted model.

``from extract import load_embeddings`` imports only numpy, pandas and pyarrow (no torch, no
``convert``), so analysis scripts and heads can read caches anywhere.
"""

from extract.cache import CacheError, list_datasets, list_keys, load_embeddings

__all__ = ["CacheError", "list_datasets", "list_keys", "load_embeddings"]
