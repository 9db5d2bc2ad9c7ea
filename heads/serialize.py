"""A fitted head as data, not code: ``head.json`` (what each object is) + ``head.npz`` (its arrays).

A pickle names any importable callable and runs it on load, so a head someone sends you could
run anything. Here the description can only name the handful of types in :data:`STEP_TYPES`;
loading builds each with its constructor from named parameters, then sets the fitted
attributes listed for that type, from JSON values and ``np.load(..., allow_pickle=False)``
arrays. The rebuilt objects are the real ones (``HeadClassifier``, scikit-learn's MLP, ...)
holding the same arrays, so ``predict`` / ``predict_proba`` / ``heads.export`` give the same
numbers, bit for bit.

What is kept: constructor parameters and the attributes prediction and inspection use
(weights, classes, ``n_features_in_``, loss curves). Not kept: optimiser state and random
generators (``MLPClassifier._optimizer``, ``_random_state``), so ``partial_fit`` / warm starts
begin afresh on a loaded head, as a refit would.

Values in ``head.json``: JSON null / bool / number / string / list as themselves; tagged
objects ``{"$array": key}`` (an array in ``head.npz``), ``{"$tuple": [...]}``,
``{"$scalar": dtype, "value": v}`` (a numpy scalar), ``{"$objects": [...]}`` (a 1-D object
array of plain values, e.g. string labels), ``{"$estimator": {"type", "params", "fitted"}}``.
"""

from __future__ import annotations

import inspect
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import LabelBinarizer

from convert.errors import GraftError
from heads.estimators import FeaturePreprocessor, HeadClassifier, HeadRegressor
from heads.torch_mlp import TorchMLP

FORMAT = "graft-estimator/1"
DESCRIPTION = "head.json"
ARRAYS = "head.npz"
#: nesting deeper than any head graft writes (head -> MLP -> label binarizer -> its classes)
MAX_DEPTH = 12
#: array kinds np.load reads without pickle: bool, ints, floats, complex, str, bytes
_ARRAY_KINDS = "biufcUS"
_PLAIN = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class StepType:
    """A class graft stores, and the fitted attributes saved and restored for it."""

    cls: type
    fitted: tuple[str, ...]


_MLP_FITTED = ("n_features_in_", "feature_names_in_", "n_outputs_", "n_iter_", "t_", "n_layers_", "out_activation_",
               "coefs_", "intercepts_", "loss_", "loss_curve_", "validation_scores_", "best_validation_score_",
               "best_loss_")
_HEAD_FITTED = ("n_features_in_", "feature_names_in_", "preprocessor_", "coef_", "intercept_", "n_iter_", "mlp_",
                "mlp_backend_")

#: every type a head file may name; nothing else is ever built from a file
STEP_TYPES: dict[str, StepType] = {
    "graft.HeadClassifier": StepType(HeadClassifier, ("classes_", *_HEAD_FITTED)),
    "graft.HeadRegressor": StepType(HeadRegressor, (*_HEAD_FITTED, "y_mean_", "y_scale_", "clip_range_")),
    "graft.FeaturePreprocessor": StepType(FeaturePreprocessor, ("n_features_in_", "feature_names_in_", "mean_", "scale_",
                                                                "pca_mean_", "components_", "n_features_out_")),
    "graft.TorchMLP": StepType(TorchMLP, ("coefs_", "intercepts_", "out_activation_", "n_iter_", "loss_curve_",
                                          "validation_scores_")),
    "sklearn.MLPClassifier": StepType(MLPClassifier, ("_label_binarizer", "classes_", *_MLP_FITTED)),
    "sklearn.MLPRegressor": StepType(MLPRegressor, _MLP_FITTED),
    "sklearn.LabelBinarizer": StepType(LabelBinarizer, ("y_type_", "sparse_input_", "classes_")),
}
_NAME_OF = {t.cls: name for name, t in STEP_TYPES.items()}


def param_names(cls: type) -> tuple[str, ...]:
    """Constructor parameters, as scikit-learn's ``get_params`` finds them (TorchMLP stores its own alike)."""
    sig = inspect.signature(cls.__init__)
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return tuple(p.name for p in sig.parameters.values() if p.name != "self" and p.kind not in skip)


# ----------------------------------------------------------------------------- save


def _encode_estimator(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> dict:
    name = _NAME_OF.get(type(obj))
    if name is None:
        raise GraftError(f"cannot save {path or 'the head'} without pickle: {type(obj).__module__}.{type(obj).__qualname__} "
                         f"is not one of graft's head types ({', '.join(STEP_TYPES)})")
    step = STEP_TYPES[name]
    params = {p: encode(getattr(obj, p), f"{path}{p}", arrays) for p in param_names(step.cls)}
    fitted = {a: encode(getattr(obj, a), f"{path}{a}", arrays) for a in step.fitted if hasattr(obj, a)}
    return {"$estimator": {"type": name, "params": params, "fitted": fitted}}


def _encode_array(value: np.ndarray, path: str, arrays: dict[str, np.ndarray]) -> dict:
    if value.dtype.kind in _ARRAY_KINDS:
        arrays[path] = value
        return {"$array": path}
    items = value.tolist() if value.dtype.kind == "O" and value.ndim == 1 else None
    if items is None or not all(isinstance(v, _PLAIN) for v in items):
        raise GraftError(f"cannot save {path} without pickle: a {value.dtype} array of shape {value.shape}")
    return {"$objects": [v.item() if isinstance(v, np.generic) else v for v in items]}


def encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON-able data; arrays go into ``arrays`` under their attribute path."""
    if isinstance(value, np.generic):  # before the plain types: np.float64 is a float
        if value.dtype.kind not in _ARRAY_KINDS:
            raise GraftError(f"cannot save {path} without pickle: a numpy {value.dtype} scalar")
        return {"$scalar": value.dtype.str, "value": value.item()}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, np.ndarray):
        return _encode_array(value, path, arrays)
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, f"{path}.{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{path}.{i}", arrays) for i, v in enumerate(value)]
    return _encode_estimator(value, f"{path}.", arrays)


def save(folder: str | os.PathLike, est: Any) -> None:
    """Write ``est`` as ``head.json`` + ``head.npz`` into ``folder``; a type graft does not know is an error."""
    arrays: dict[str, np.ndarray] = {}
    desc = {"format": FORMAT, "estimator": _encode_estimator(est, "", arrays)}
    folder = Path(folder)
    np.savez_compressed(folder / ARRAYS, **arrays)
    (folder / DESCRIPTION).write_text(json.dumps(desc, indent=1) + "\n")


# ----------------------------------------------------------------------------- load


class _Arrays:
    """The arrays of ``head.npz``, read on demand without pickle."""

    def __init__(self, npz: Any, where: Path):
        self.npz = npz
        self.where = where

    def __call__(self, key: Any) -> np.ndarray:
        if not isinstance(key, str) or key not in self.npz.files:
            raise GraftError(f"{self.where}: no array {key!r}")
        try:
            return self.npz[key]
        except ValueError as err:  # an object array: np.load refuses it without pickle
            raise GraftError(f"{self.where}: array {key!r}: {err}") from err


def _scalar(spec: Any, value: Any) -> np.generic:
    try:
        dtype = np.dtype(spec) if isinstance(spec, str) else None
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _ARRAY_KINDS or not isinstance(value, _PLAIN):
        raise GraftError(f"bad numpy scalar {spec!r}: {value!r}")
    return np.array(value, dtype=dtype)[()]


def _objects(items: Any) -> np.ndarray:
    if not isinstance(items, list) or not all(isinstance(v, _PLAIN) for v in items):
        raise GraftError("an object array holds only plain JSON values")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _decode_estimator(spec: Any, arrays: _Arrays, depth: int) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise GraftError("an estimator entry needs a type")
    step = STEP_TYPES.get(spec["type"])
    if step is None:
        raise GraftError(f"unknown head step type {spec['type']!r}: graft builds only {', '.join(STEP_TYPES)}")
    params, fitted = spec.get("params") or {}, spec.get("fitted") or {}
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise GraftError(f"{spec['type']}: params and fitted must be objects")
    unknown = sorted(set(params) - set(param_names(step.cls))) + sorted(set(fitted) - set(step.fitted))
    if unknown:
        raise GraftError(f"{spec['type']}: unknown parameter(s) or attribute(s) {unknown}")
    obj = step.cls(**{k: decode(v, arrays, depth + 1) for k, v in params.items()})
    for k, v in fitted.items():
        setattr(obj, k, decode(v, arrays, depth + 1))
    return obj


#: tag -> how to rebuild its value: (payload, the whole entry, arrays, depth)
_TAGS: dict[str, Callable[[Any, dict, _Arrays, int], Any]] = {
    "$array": lambda v, e, arrays, d: arrays(v),
    "$tuple": lambda v, e, arrays, d: tuple(decode(x, arrays, d + 1) for x in _as_list(v)),
    "$scalar": lambda v, e, arrays, d: _scalar(v, e.get("value")),
    "$objects": lambda v, e, arrays, d: _objects(v),
    "$estimator": lambda v, e, arrays, d: _decode_estimator(v, arrays, d),
}


def _as_list(v: Any) -> list:
    if not isinstance(v, list):
        raise GraftError(f"expected a list, got {type(v).__name__}")
    return v


def decode(value: Any, arrays: _Arrays, depth: int = 0) -> Any:
    """The value :func:`encode` wrote; only registered types are ever built."""
    if depth > MAX_DEPTH:
        raise GraftError("head description nested too deeply")
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list):
        return [decode(v, arrays, depth + 1) for v in value]
    tags = [k for k in value if k in _TAGS] if isinstance(value, dict) else []
    if len(tags) != 1:
        raise GraftError(f"unrecognised entry in the head description: {json.dumps(value)[:80]}")
    return _TAGS[tags[0]](value[tags[0]], value, arrays, depth)


def load(folder: str | os.PathLike) -> Any:
    """The estimator of ``head.json`` + ``head.npz`` in ``folder``; no pickle is read, no file-named code runs."""
    folder = Path(folder)
    try:
        desc = json.loads((folder / DESCRIPTION).read_text())
    except (OSError, ValueError) as err:
        raise GraftError(f"{folder / DESCRIPTION}: {err}") from err
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise GraftError(f"{folder / DESCRIPTION}: format {desc.get('format') if isinstance(desc, dict) else None!r}, expected {FORMAT!r}")
    try:
        npz = np.load(folder / ARRAYS, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise GraftError(f"{folder / ARRAYS}: {err}") from err
    with npz:
        try:
            est = decode(desc.get("estimator"), _Arrays(npz, folder / ARRAYS))
        except (GraftError, TypeError, ValueError) as err:  # TypeError / ValueError: a constructor refusing a value
            raise GraftError(f"{folder / DESCRIPTION}: {err}") from err
    if not isinstance(est, (HeadClassifier, HeadRegressor)):
        raise GraftError(f"{folder / DESCRIPTION}: holds a {type(est).__name__}, not a head")
    return est
