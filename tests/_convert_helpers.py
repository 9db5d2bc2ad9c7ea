"""Shared helpers for the convert/ tests: test-bed paths, runtimes (onnxruntime, torch,
OpenCV's independent Caffe importer) and a tolerance check relative to the blob's magnitude."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
CAFFE = TESTBED / "caffe"

needs_testbed = pytest.mark.skipif(not CAFFE.is_dir(), reason=f"test bed absent: {CAFFE} (real Caffe models)")

#: tolerance of every numeric comparison: |a - b| <= ATOL + RTOL * max|reference|
RTOL = 1e-4
ATOL = 1e-5


def assert_close(ref: np.ndarray, got: np.ndarray, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = float(np.abs(ref - got).max()) if ref.size else 0.0
    assert err <= atol + rtol * scale, f"{what}: max abs diff {err:.3g} > {atol:g} + {rtol:g} * max|ref| {scale:.3g}"


def ort_session(model):
    """An onnxruntime CPU session for a path or an in-memory ModelProto."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_ort(model, feeds: dict, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    return dict(zip(outputs, sess.run(list(outputs), feeds)))


def run_torch(net, x: np.ndarray, blobs: Sequence[str]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), blobs=list(blobs))
    return {k: v.numpy() for k, v in out.items()}


def opencv_net(prototxt: Path, caffemodel: Path):
    """OpenCV's own Caffe importer (independent implementation), or None if it refuses the net."""
    cv2 = pytest.importorskip("cv2")
    try:
        net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    except cv2.error:
        return None
    net.enableFusion(False)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def opencv_forward(net, x: np.ndarray, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """Each named *layer*'s (first) output; OpenCV keeps no blob names, only layer outputs."""
    net.setInput(np.ascontiguousarray(x, dtype=np.float32))
    outs = net.forward(list(layers))
    return dict(zip(layers, outs))


def layer_outputs(graph) -> dict[str, str]:
    """Caffe layer name -> the graph value that layer produced (its first top)."""
    return {n.name: n.outputs[0] for n in graph.nodes}


def as_shape(arr: np.ndarray, shape) -> np.ndarray:
    """OpenCV may drop trailing unit axes (InnerProduct gives (N, C)); same element count only."""
    shape = tuple(shape)
    if arr.shape != shape and arr.size == int(np.prod(shape)):
        return arr.reshape(shape)
    return arr


def cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python cli.py ...`` from the repository root, as a user would run it."""
    return subprocess.run([sys.executable, "cli.py", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
