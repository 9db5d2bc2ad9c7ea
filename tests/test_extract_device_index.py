"""``--device cuda:N``: one parser for every command, a one-line error for an index torch does not
see, the index carried to torch and onnxruntime, and never into the cache key.

No GPU here: CUDA is faked by monkeypatching what ``extract.backends`` asks torch; the runs on a
real second GPU are for a machine that has one (``bench/bench_extract_gpu.py``)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
FACES = TESTBED / "faces" / "imdbwiki" / "gender-data" / "test"
needs_testbed = pytest.mark.skipif(not (DET3 / "det3.caffemodel").is_file() or not FACES.is_dir(),
                                   reason=f"test bed absent: {TESTBED}")


# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                            ("cuda:0", ("cuda", 0)), ("cuda:1", ("cuda", 1)), ("cuda:12", ("cuda", 12))])
def test_parse_device_accepts(text: str, want: tuple) -> None:
    from extract.backends import parse_device

    assert parse_device(text) == want


@pytest.mark.parametrize("text", ["cuda:x", "cuda:-1", "cuda:", "cuda:1.5", "gpu", "CUDA", "cpu:0", "auto:1", "cuda:1:2", ""])
def test_parse_device_refuses_in_one_line(text: str) -> None:
    from extract.backends import BackendError, parse_device

    with pytest.raises(BackendError) as err:
        parse_device(text)
    assert str(err.value).startswith(f"--device {text}: ") and "\n" not in str(err.value)


def test_cli_type_canonicalises_and_refuses() -> None:
    from convert.cli_common import device

    assert [device(t) for t in ("auto", "cpu", "cuda", "cuda:1", "cuda:01")] == ["auto", "cpu", "cuda", "cuda:1", "cuda:1"]
    with pytest.raises(argparse.ArgumentTypeError, match=r"got 'cuda:x'"):
        device("cuda:x")


@pytest.mark.parametrize("argv", [
    ["extract", "--model", "m", "--layer", "l", "--images", "."],
    ["predict", "--out", "p.csv"],
    ["finetune", "--model", "m"],
])
def test_every_device_flag_takes_an_index(argv: list[str]) -> None:
    import cli

    args = cli.build_parser(argv).parse_args([*argv, "--device", "cuda:1"])
    assert args.device == "cuda:1"
    assert cli.build_parser(argv).parse_args(argv).device == "auto"


def test_cli_bad_device_is_exit_2_and_one_line(capsys) -> None:
    import cli

    rc = cli.main(["extract", "--model", "m", "--layer", "l", "--images", ".", "--device", "cuda:x"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: argument --device: ") and "'cuda:x'" in lines[0]


# -- resolve: the index checked against what torch sees ----------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch):
    """torch that sees two CUDA devices; returns the device indices made current (bf16 checks)."""
    import torch

    from extract import backends

    made_current: list[int] = []

    @contextlib.contextmanager
    def fake_device(index):
        made_current.append(index)
        yield

    monkeypatch.setattr(backends, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return made_current


def test_in_range_index_is_kept(two_gpus) -> None:
    from extract.backends import resolve

    assert resolve("torch", "cuda:1", "fp32") == ("torch", "cuda:1", "fp32")
    assert resolve("auto", "cuda:1", "auto") == ("torch", "cuda:1", "bf16")
    assert two_gpus == [1]  # bf16 support asked of GPU 1, not of the current one
    assert resolve("auto", "cuda", "auto") == ("torch", "cuda", "bf16")


@pytest.mark.parametrize(("count", "seen"), [(2, "2 CUDA devices (0-1)"), (1, "1 CUDA device (0)")])
def test_out_of_range_index_is_one_line(two_gpus, monkeypatch, count: int, seen: str) -> None:
    import torch

    from extract.backends import BackendError, resolve

    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(BackendError) as err:
        resolve("torch", "cuda:3", "auto")
    assert str(err.value) == f"--device cuda:3: torch sees {seen}"


def test_no_gpu_names_the_requested_device(monkeypatch) -> None:
    from extract import backends

    monkeypatch.setattr(backends, "_cuda_available", lambda: False)
    with pytest.raises(backends.BackendError, match=r"^--device cuda:1: torch sees no CUDA device$"):
        backends.resolve("auto", "cuda:1", "auto")


def test_onnxruntime_without_cuda_keeps_its_message(monkeypatch) -> None:
    from extract import backends

    monkeypatch.setattr(backends, "_ort_cuda_available", lambda: False)
    with pytest.raises(backends.BackendError, match=r"--device cuda:1 --backend onnxruntime: CUDAExecutionProvider is not available"):
        backends.resolve("onnxruntime", "cuda:1", "auto")


def test_onnxruntime_providers_carry_the_device_id() -> None:
    from extract.backends import _ort_providers

    assert _ort_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert _ort_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _ort_providers("cpu") == ["CPUExecutionProvider"]


def test_gpu_checks_see_an_index_as_cuda() -> None:
    from extract.backends import default_batch_size, default_workers, device_kind
    from extract.pipeline import _ships_uint8

    class Fake:
        takes_uint8 = True
        device = "cuda:1"

    assert device_kind("cuda:1") == "cuda" and device_kind("cpu") == "cpu"
    assert default_batch_size("cuda:1") == default_batch_size("cuda") == 64
    assert default_workers("cuda:1") == default_workers("cuda")
    assert _ships_uint8(Fake(), None)


def test_finetune_runtime_takes_an_index(two_gpus) -> None:
    pytest.importorskip("google.protobuf")
    from convert.errors import GraftError
    from finetune.train import resolve_runtime

    rt = resolve_runtime("cuda:1", "auto")
    assert str(rt.device) == "cuda:1" and rt.precision == "bf16"
    with pytest.raises(GraftError, match=r"^--device cuda:2: torch sees 2 CUDA devices \(0-1\)$"):
        resolve_runtime("cuda:2")


# -- real runs on the CPU; the index never enters the cache key -------------------------------------


@pytest.fixture(scope="module")
def det3(tmp_path_factory):
    from convert import convert_model

    out = tmp_path_factory.mktemp("det3") / "pkg"
    return convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", out, "det3", log=lambda _m: None)


@needs_testbed
def test_onnxruntime_cuda_fallback_names_the_index(det3, monkeypatch) -> None:
    """onnxruntime asked for GPU 1 gets ``device_id`` 1; a silent CPU fallback is still an error."""
    import onnxruntime as ort

    from extract.backends import BackendError, OrtBackend

    real, asked = ort.InferenceSession, []

    def session(path, opts=None, providers=None):
        asked.append(providers)
        return real(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(BackendError, match=r"^--device cuda:1: onnxruntime runs on CPUExecutionProvider, not CUDA"):
        OrtBackend(det3, ["conv5"], device="cuda:1")
    assert asked == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]


@needs_testbed
def test_cpu_extract_runs_and_a_gpu_index_reuses_its_cache_key(det3, tmp_path, monkeypatch, capsys, two_gpus) -> None:
    """``--device cpu`` computes for real; the same request on ``cuda:1`` (faked: every image is
    cached, so no network is built) finds the very same key folder and reports torch-cuda:1."""
    import cli
    from extract.pipeline import extract
    from extract.sources import from_folder

    cache = tmp_path / "cache"
    images = tmp_path / "faces"
    images.mkdir()
    for src in sorted(FACES.rglob("*.jpg"))[:6]:
        (images / src.name).write_bytes(src.read_bytes())
    base = ["extract", "--model", str(det3.dir), "--layer", "conv5", "--images", str(images), "--cache", str(cache),
            "--precision", "fp32", "--no-progress"]
    assert cli.main([*base, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "0 already cached, 6 computed, 0 failed" in out and "onnxruntime-cpu" in out
    keys = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(keys) == 1

    summary, _ = extract(det3.dir, ["conv5"], from_folder(images), cache=cache, device="cuda:1", precision="fp32",
                         progress=False)
    assert summary.computed == 0 and summary.cached == 6
    assert summary.backend == "torch-cuda:1"
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == keys
