"""Run the emitted ONNX model (onnxruntime) and the torch module on the same inputs and
compare every blob. A conversion whose two emitted models disagree is not written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from .ir import Graph

ATOL = 1e-5
RTOL = 1e-3  # relative to the blob's largest magnitude: float32 sums in another order differ ~1e-6


def compare(ref: np.ndarray, other: np.ndarray) -> dict:
    ref = np.asarray(ref, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if ref.shape != other.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "shape": [list(ref.shape), list(other.shape)]}
    with np.errstate(invalid="ignore", over="ignore"):
        same = (ref == other) | (np.isnan(ref) & np.isnan(other))  # equal infinities/NaNs agree
        diff = np.where(same, 0.0, np.abs(ref - other))
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite = np.abs(ref[np.isfinite(ref)])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(finite.max()) if finite.size else 0.0
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else 0.0, "max_ref": scale}


def passes(stats: dict, atol: float = ATOL, rtol: float = RTOL) -> bool:
    return stats["max_abs"] <= atol + rtol * stats.get("max_ref", 0.0)


def verify_package(
    graph: Graph,
    model: onnx.ModelProto,
    model_dir: Path,
    net: torch.nn.Module,
    x: np.ndarray,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict:
    """Every named value from onnxruntime vs torch; ``model`` is the package's graph (its
    initializers reference files in ``model_dir``)."""
    import onnxruntime as ort

    values = [v for v in graph.shapes if v not in graph.inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for v in values:
        if v not in existing:
            probe.graph.output.add().name = v
    probe_path = model_dir / "_verify.onnx"
    onnx.save(probe, str(probe_path))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # One run only: re-packing every weight matrix for faster GEMMs costs more than it saves
        # (1.5 s of VGG-Face's 580 MB at session creation), and does not change the graph's values.
        opts.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(str(probe_path), opts, providers=["CPUExecutionProvider"])
        input_name = next(iter(graph.inputs))
        ort_out = dict(zip(values, sess.run(values, {input_name: x})))
        del sess
    finally:
        probe_path.unlink(missing_ok=True)
    with torch.inference_mode():
        torch_out = net(torch.from_numpy(x), blobs=values)
    report = {}
    for v in values:
        stats = compare(ort_out[v], torch_out[v].numpy())
        stats["passed"] = passes(stats, atol, rtol)
        report[v] = stats
    failed = [v for v, s in report.items() if not s["passed"]]
    return {
        "passed": not failed,
        "failed": failed,
        "atol": atol,
        "rtol": rtol,
        "batch": int(x.shape[0]),
        "reference": "onnxruntime CPU vs torch CPU, float32, random 0..255 images through the recorded mean/scale",
        "blobs": {v: {k: (round(val, 9) if isinstance(val, float) else val) for k, val in s.items()} for v, s in report.items()},
    }
