"""A head on disk: ``head.json`` + ``head.npz`` (the estimator) + ``card.json`` (what it is and what it needs).

The card names the task, the label names, the model (by weights sha256) and blob, the cache key
the features came from, the preprocessing, the scores and the library versions. Loading checks
the card against the model / blob / cache it is about to be used with and lists every mismatch
in one message: features of another blob or other preprocessing would give confident nonsense.

Security: the estimator is stored as data (``heads.serialize``): ``head.json`` may name only
graft's few head types, ``head.npz`` is read with ``allow_pickle=False``, so loading a head
someone sent you runs none of their code. Heads written by older graft versions are
``head.joblib``, a pickle: loading one runs whatever code it names, so :func:`load_head`
refuses it unless ``allow_pickle=True`` (``--allow-pickle`` on the command line) says the
sender is trusted. Re-saving it (:func:`save_estimator`) converts it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import joblib

from convert.errors import GraftError
from heads import serialize

CARD_FORMAT = "graft-head/1"
CARD = "card.json"
#: the pickled estimator of heads written before the safe format; read only with allow_pickle=True
PICKLE = "head.joblib"


def library_versions() -> dict[str, str]:
    """Versions that matter for loading (old pickled heads) and for reproducing the numbers."""
    import numpy
    import pandas
    import scipy
    import sklearn

    out = {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "joblib": joblib.__version__,
        "pandas": pandas.__version__,
    }
    try:
        from importlib.metadata import version

        out["graft"] = version("graft")
    except Exception:  # not installed as a distribution: running from the source tree
        out["graft"] = "source"
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class AtomicDir:
    """Write into a temporary sibling folder; on success it replaces ``target`` in one rename.

    A crash leaves the old head (or nothing) in place, never half a head. The previous folder,
    if any, is moved aside first and removed only after the new one is in place.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save_estimator(folder: str | os.PathLike, est: Any, card: dict) -> None:
    """Write the estimator (``head.json`` + ``head.npz``, no pickle) and its card into ``folder``
    (normally an :class:`AtomicDir`)."""
    serialize.save(folder, est)
    (Path(folder) / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")


def check_loadable(head_dir: str | os.PathLike, *, allow_pickle: bool = False) -> str:
    """Which estimator file :func:`load_head` will read ("safe" or "pickle"); raises before any
    work is done when it is a pickle and ``allow_pickle`` is not given, or when there is none."""
    d = Path(head_dir)
    if (d / serialize.DESCRIPTION).exists():
        return "safe"
    if (d / PICKLE).exists():
        if not allow_pickle:
            raise GraftError(f"head {head_dir} is a pickle ({PICKLE}, written by an older graft): loading it runs code from "
                             "the file; pass --allow-pickle (allow_pickle=True) only if you trust where it came from")
        return "pickle"
    raise GraftError(f"head {head_dir} has no estimator ({serialize.DESCRIPTION} + {serialize.ARRAYS})")


def read_card(head_dir: str | os.PathLike) -> dict:
    p = Path(head_dir) / CARD
    if not p.exists():
        raise GraftError(f"{head_dir} is not a head folder (no {CARD})")
    try:
        card = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise GraftError(f"{p}: not a readable card ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None
    if card.get("format") != CARD_FORMAT:
        raise GraftError(f"{p}: format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    return card


#: cache-key parts added after heads were first written: absent from an old card, not a mismatch
OPTIONAL_KEY_PARTS = {"graph_sha256"}


def check_card(
    card: dict,
    *,
    weights_sha256: str | None = None,
    layer: str | None = None,
    cache_config: dict | None = None,
    feature_dim: int | None = None,
) -> list[str]:
    """Every way the card disagrees with what it is about to be used with (empty: all agree)."""
    diffs = []
    want = card.get("model", {}).get("weights_sha256")
    if weights_sha256 is not None and want and weights_sha256 != want:
        diffs.append(f"model weights sha256 {weights_sha256[:12]}… but the head was trained on {want[:12]}… ({card['model'].get('name')})")
    if layer is not None and layer != card.get("layer"):
        diffs.append(f"layer {layer!r} but the head was trained on {card.get('layer')!r}")
    if feature_dim is not None and card.get("feature_dim") and int(feature_dim) != int(card["feature_dim"]):
        diffs.append(f"{feature_dim}-d features but the head expects {card['feature_dim']}-d")
    have = (card.get("cache") or {}).get("config")
    if cache_config is not None and have:
        for k in sorted(set(have) | set(cache_config)):
            if k in ("preprocess",) and isinstance(have.get(k), dict) and isinstance(cache_config.get(k), dict):
                for kk in sorted(set(have[k]) | set(cache_config[k])):
                    if have[k].get(kk) != cache_config[k].get(kk):
                        diffs.append(f"cache preprocess.{kk} = {cache_config[k].get(kk)!r} but the head's features used {have[k].get(kk)!r}")
            elif k not in have and k in OPTIONAL_KEY_PARTS:
                continue  # a head fitted before graft recorded it: nothing to compare with
            elif have.get(k) != cache_config.get(k):
                what = "graph (deploy net)" if k == "graph_sha256" else k
                diffs.append(f"cache {what} = {cache_config.get(k)!r} but the head's features used {have.get(k)!r}")
    return diffs


def load_head(
    head_dir: str | os.PathLike,
    *,
    weights_sha256: str | None = None,
    layer: str | None = None,
    cache_config: dict | None = None,
    feature_dim: int | None = None,
    allow_pickle: bool = False,
) -> tuple[Any, dict]:
    """The estimator and card of a head folder, after checking the card against what is given.

    Raises :class:`GraftError` listing every difference. Warns when the scikit-learn version
    differs from the one that saved the head. A ``head.joblib`` (an older head, a pickle: it
    runs code when loaded) is read only with ``allow_pickle=True``.
    """
    card = read_card(head_dir)
    diffs = check_card(card, weights_sha256=weights_sha256, layer=layer, cache_config=cache_config, feature_dim=feature_dim)
    if diffs:
        raise GraftError(f"head {head_dir} does not match: " + "; ".join(diffs))
    import sklearn

    saved = card.get("versions", {}).get("scikit-learn")
    if saved and saved != sklearn.__version__:
        warnings.warn(f"head {head_dir} was saved with scikit-learn {saved}, this is {sklearn.__version__}", stacklevel=2)
    if check_loadable(head_dir, allow_pickle=allow_pickle) == "safe":
        est = serialize.load(head_dir)
    else:
        est = joblib.load(Path(head_dir) / PICKLE)
    n_in, want = getattr(est, "n_features_in_", None), card.get("feature_dim")
    if n_in is not None and want and int(n_in) != int(want):
        raise GraftError(f"head {head_dir}: the estimator takes {n_in}-d features but its card says {want}-d")
    return est, card
