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


# -- the GPU data path, checked on the CPU: uint8 pixels normalised by the backend ------------


@pytest.mark.parametrize("pre", [
    {"channel_order": "rgb", "mean": [127.5] * 3, "scale": 0.0078125, "resize": [50, 52], "crop": 48},
    {"channel_order": "bgr", "mean": [104, 117, 123], "scale": 1.0, "resize": 48, "transpose": True},
    {"channel_order": "bgr", "resize": [52, 52], "crop": 48, "mean_file": "mean"},
])
def test_device_normalize_equals_host_normalize(pre):
    import numpy as np
    import torch

    from extract.backends import DeviceNormalize
    from extract.preprocess import Preprocess

    rng = np.random.default_rng(0)
    mean_image = rng.uniform(0, 255, (3, 52, 52)).astype(np.float32) if pre.get("mean_file") else None
    pp = Preprocess.from_dict({k: v for k, v in pre.items() if k != "mean_file"}, mean_image=mean_image)
    batch = rng.integers(0, 256, (3, *pp.output_size(), 3), dtype=np.uint8)
    got = DeviceNormalize(pp, "cpu")(torch.from_numpy(batch)).contiguous().numpy()
    want = pp.normalize(batch)
    assert got.shape == want.shape and np.array_equal(got, want)  # bit for bit: the same float32 ops


def test_pipeline_shipping_uint8_equals_the_host_path(det3, tmp_path):
    """torch with device-side preprocessing (what CUDA runs) stores exactly the host path's rows."""
    import numpy as np

    from extract.cache import CacheWriter, cache_key, read_key
    from extract.pipeline import cache_config, resolve_preprocess, run_pipeline
    from extract.sources import from_folder

    faces = REPO.parent / "shared" / "testbed" / "faces" / "imdbwiki" / "gender-data" / "test"
    records = from_folder(faces).head(10)
    pp = resolve_preprocess(det3, {"mean": [127.5] * 3, "scale": 0.0078125, "channel_order": "rgb", "transpose": True})
    rows = {}
    for u8 in (False, True):
        from extract.backends import TorchBackend

        net = TorchBackend(det3, ["conv5", "prob1"], device="cpu", preprocess=pp)
        config = cache_config(det3.weights_sha256, pp, "float32", False, "fp32")
        with CacheWriter(tmp_path / str(u8) / cache_key(config), config, ["conv5", "prob1"], shard_size=4) as w:
            summary, _ = run_pipeline(records.copy(), net, w, pp, batch_size=3, workers=2, progress=False,
                                      device_preprocess=u8, stat_memo=False)
            assert summary.computed == 10
            rows[u8] = {b: np.asarray(read_key(w.dir, b)[0]) for b in ("conv5", "prob1")}
    for b in ("conv5", "prob1"):
        assert np.array_equal(rows[False][b], rows[True][b])
