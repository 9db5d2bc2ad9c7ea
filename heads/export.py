"""A head as ONNX nodes, alone (features in) or fused behind the backbone (image tensor in).

The head's arithmetic is written out with plain ops, in the order ``FeaturePreprocessor`` and
the learner apply it: Flatten -> [ReduceL2, Max, Div] -> [Sub mean, Div scale] -> [Sub, MatMul
PCA] -> MatMul + Add (or the MLP's MatMul/Add/Relu chain) -> Sigmoid / Softmax -> ArgMax ->
Gather of the label names. Outputs: ``probabilities`` (N, k) float32 and ``label`` (N,) with
the class names as strings (classification), or ``prediction`` (N,) float32 (regression).

Ridge classifiers are not probabilistic; their ``probabilities`` are the same squashed scores
``HeadClassifier.predict_proba`` returns (softmax, or sigmoid of twice the binary score).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convert.errors import GraftError

PREFIX = "head/"
_EPS = 1e-12


class _Builder:
    """Collects nodes and initializers with unique, prefixed names."""

    def __init__(self, opset: int, prefix: str = PREFIX):
        self.opset = opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        full = f"{self.prefix}{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.n += 1
        out = out or f"{self.prefix}{op_type.lower()}_{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{self.prefix}{op_type}_{self.n}", **attrs))
        return out


def _reduce_l2(b: _Builder, x: str) -> str:
    if b.opset >= 18:
        return b.op("ReduceL2", [x, b.const("l2_axes", np.array([1], np.int64))], keepdims=1)
    return b.op("ReduceL2", [x], axes=[1], keepdims=1)


def _preprocess(b: _Builder, x: str, pre) -> str:
    x = b.op("Flatten", [x], axis=1)
    if pre.mode.startswith("l2"):
        norm = b.op("Max", [_reduce_l2(b, x), b.const("l2_eps", np.array(_EPS, np.float32))])
        x = b.op("Div", [x, norm])
    if pre.mode.endswith("standardize"):
        x = b.op("Sub", [x, b.const("mean", pre.mean_.astype(np.float32))])
        x = b.op("Div", [x, b.const("scale", pre.scale_.astype(np.float32))])
    if pre.components_ is not None:
        x = b.op("Sub", [x, b.const("pca_mean", pre.pca_mean_.astype(np.float32))])
        x = b.op("MatMul", [x, b.const("pca_components_t", np.ascontiguousarray(pre.components_.T, np.float32))])
    return x


def _mlp(b: _Builder, x: str, mlp) -> str:
    act = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}[mlp.activation]
    last = len(mlp.coefs_) - 1
    for i, (W, c) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        x = b.op("MatMul", [x, b.const(f"mlp_w{i}", W.astype(np.float32))])
        x = b.op("Add", [x, b.const(f"mlp_b{i}", c.astype(np.float32))])
        if i < last and act:
            x = b.op(act, [x])
    return x


def head_nodes(est, features: str, *, opset: int = 17, prefix: str = PREFIX) -> tuple[list, list, list]:
    """(nodes, initializers, graph outputs) computing the head from tensor ``features``."""
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(est, "preprocessor_")
    b = _Builder(opset, prefix)
    z = _preprocess(b, features, est.preprocessor_)
    is_clf = hasattr(est, "classes_")
    if est.head == "mlp":
        s = _mlp(b, z, est.mlp_)
    else:
        s = b.op("MatMul", [z, b.const("coef", est.coef_.astype(np.float32))])
        s = b.op("Add", [s, b.const("intercept", est.intercept_.astype(np.float32))])
    outputs = []
    if is_clf:
        k = len(est.classes_)
        binary_column = (est.head != "mlp" and est.coef_.shape[1] == 1) or (est.head == "mlp" and est.mlp_.out_activation_ == "logistic")
        if binary_column:
            if est.head == "ridge":
                s = b.op("Mul", [s, b.const("two", np.array(2.0, np.float32))])
            p = b.op("Sigmoid", [s])
            q = b.op("Sub", [b.const("one", np.array(1.0, np.float32)), p])
            prob = b.op("Concat", [q, p], out="probabilities", axis=1)
        else:
            prob = b.op("Softmax", [s], out="probabilities", axis=1)
        idx = b.op("ArgMax", [prob], axis=1, keepdims=0)
        names = np.array([str(c) for c in est.classes_], dtype=object)
        b.nodes.append(helper.make_node("Gather", [b.const("class_names", names), idx], ["label"], name=f"{prefix}Gather_label", axis=0))
        outputs = [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", k]),
            helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]),
        ]
    else:
        if est.head == "mlp":
            s = b.op("Mul", [s, b.const("y_scale", np.array(est.y_scale_, np.float32))])
            s = b.op("Add", [s, b.const("y_mean", np.array(est.y_mean_, np.float32))])
        clip = getattr(est, "clip_range_", None)
        if clip is not None:
            s = b.op("Clip", [s, b.const("clip_low", np.array(clip[0], np.float32)), b.const("clip_high", np.array(clip[1], np.float32))])
        b.op("Reshape", [s, b.const("flat", np.array([-1], np.int64))], out="prediction")
        outputs = [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N"])]
    return b.nodes, b.inits, outputs


def head_model(est, feature_dim: int | None = None, *, opset: int = 17) -> onnx.ModelProto:
    """The head alone: input ``features`` (N, D) float32 -> the head's outputs."""
    d = int(feature_dim or est.n_features_in_)
    nodes, inits, outputs = head_nodes(est, "features", opset=opset)
    graph = helper.make_graph(nodes, "graft_head", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", d])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="graft")
    onnx.checker.check_model(model)
    return model


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 17


def fuse(backbone: onnx.ModelProto, est, blob: str) -> onnx.ModelProto:
    """Append the head's nodes behind ``blob`` of the backbone graph; the blob output is replaced."""
    g = backbone.graph
    outs = [o.name for o in g.output]
    name = blob if blob in outs else (outs[0] if len(outs) == 1 else None)
    if name is None:
        raise GraftError(f"the backbone graph has no output {blob!r} (outputs: {outs})")
    taken = {n for node in g.node for n in node.output} | {i.name for i in g.initializer}
    clash = taken & {"probabilities", "label", "prediction"}
    if clash:
        raise GraftError(f"the backbone already has tensors named {sorted(clash)}")
    nodes, inits, outputs = head_nodes(est, name, opset=_opset(backbone))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    g.output.extend(outputs)
    return backbone


def export_head(
    head_dir: str | os.PathLike, out: str | os.PathLike, *, model: str | os.PathLike | None = None, allow_pickle: bool = False
) -> dict:
    """Write one ONNX file: the model package's graph up to the head's blob plus the head.

    ``model`` overrides the package location recorded in the card (a moved package); it is
    checked against the card's weights sha256 like every other use of the head.
    ``allow_pickle``: also load an older head's ``head.joblib`` (a pickle: it runs code).
    """
    from convert import load_package
    from heads.persist import check_loadable, load_head, read_card

    card = read_card(head_dir)
    check_loadable(head_dir, allow_pickle=allow_pickle)
    blob = card["layer"]
    where = model or card["model"].get("dir") or card["model"].get("name")
    if where is None:
        raise GraftError(f"{head_dir}: the card names no model package; give --model")
    try:
        pkg = load_package(str(where))
    except FileNotFoundError as err:
        raise GraftError(f"model package {where} not found (give --model)") from err
    est, card = load_head(head_dir, weights_sha256=pkg.weights_sha256, layer=blob, allow_pickle=allow_pickle)
    src = Path(pkg.onnx_path_for([blob]))
    backbone = onnx.load(str(src), load_external_data=True)
    fused = fuse(backbone, est, blob)
    fused.producer_name = "graft"
    meta = {"graft.head": card.get("name", ""), "graft.task": card["task"]["name"], "graft.layer": blob,
            "graft.model_weights_sha256": pkg.weights_sha256 or "", "graft.labels": ",".join(map(str, card.get("labels") or []))}
    for k, v in meta.items():
        fused.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    large = fused.ByteSize() > 1_800_000_000 if _fits_proto(fused) else True
    if large:
        data_name = f"{out.name}.data"
        onnx.save_model(fused, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    else:
        onnx.save_model(fused, str(tmp))
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, out)
    return {"path": str(out), "input": pkg.input_name, "blob": blob, "outputs": [o.name for o in fused.graph.output],
            "external_data": f"{out.name}.data" if large else None}


def _fits_proto(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size a message past 2 GiB
        return False
