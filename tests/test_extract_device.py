"""onnxruntime is honest about its device: the provider a session actually uses is what the
backend reports, and asking for CUDA when onnxruntime silently fell back to CPU is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DET3 = REPO.parent / "shared" / "testbed" / "caffe" / "mtcnn"

pytestmark = pytest.mark.skipif(not DET3.is_dir(), reason=f"test bed absent: {DET3}")


@pytest.fixture(scope="module")
def det3(tmp_path_factory):
    from convert import convert_model

    out = tmp_path_factory.mktemp("det3") / "pkg"
    return convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", out, "det3", log=lambda _m: None)


def test_cpu_session_reports_its_provider(det3):
    from extract.backends import OrtBackend

    b = OrtBackend(det3, ["conv5"], device="cpu")
    assert b.provider == "CPUExecutionProvider" and b.name == "onnxruntime-cpu"


def test_cuda_request_that_falls_back_to_cpu_is_an_error(det3, monkeypatch):
    """What onnxruntime does when its CUDA libraries do not load: a CPU session, no exception."""
    import onnxruntime as ort

    from extract.backends import BackendError, OrtBackend

    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, opts=None, providers=None: real(path, opts, providers=["CPUExecutionProvider"]))
    with pytest.raises(BackendError, match=r"--device cuda: onnxruntime runs on CPUExecutionProvider, not CUDA"):
        OrtBackend(det3, ["conv5"], device="cuda")


def test_install_hint_names_the_co_installed_wheels(monkeypatch):
    from importlib import metadata

    from extract import backends

    monkeypatch.setattr(metadata, "version", lambda dist: "1.0")  # both onnxruntime and onnxruntime-gpu
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in backends._ort_install_hint()


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_cuda_default_precision_is_bf16_or_fp32_never_fp16(monkeypatch, bf16, expected):
    import torch

    from extract import backends

    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert backends.resolve("torch", "cuda", "auto") == ("torch", "cuda", expected)
    assert backends.resolve("auto", "cuda", "auto")[2] == expected
