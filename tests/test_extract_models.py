"""extract/ on real converted Caffe models (MTCNN det3, open_nsfw) and real test-bed faces.

Packages are converted once per session into a temporary folder. Most tests use det3 (48x48,
tiny); open_nsfw (224x224, ~0.05 s/img on 2 cores) runs on a handful of images only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
FACES = TESTBED / "faces" / "imdbwiki"
CAFFE = TESTBED / "caffe"

pytestmark = pytest.mark.skipif(not FACES.is_dir() or not CAFFE.is_dir(), reason=f"test bed absent: {TESTBED}")

MODELS = {
    "mtcnn-det3": (CAFFE / "mtcnn" / "det3.prototxt", CAFFE / "mtcnn" / "det3.caffemodel",
                   ["--channel-order", "rgb", "--mean", "127.5,127.5,127.5", "--scale", "0.0078125"]),
    "open_nsfw": (CAFFE / "open_nsfw" / "deploy.prototxt", CAFFE / "open_nsfw" / "resnet_50_1by2_nsfw.caffemodel",
                  ["--resize", "256", "--crop", "224", "--mean", "104,117,123", "--channel-order", "bgr"]),
}


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``python cli.py ...`` from the repository root."""
    proc = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Convert det3 and open_nsfw once; name -> package folder."""
    from convert import load_package  # noqa: F401 (a missing convert API is a failure, not a skip)

    out = tmp_path_factory.mktemp("models")
    pkgs = {}
    for name, (proto, weights, flags) in MODELS.items():
        cli("convert", "--prototxt", str(proto), "--caffemodel", str(weights), "--name", name, "--out", str(out / name), *flags)
        pkgs[name] = out / name
    return pkgs


def faces(n: int, sub: str = "gender-data/train/female") -> list[Path]:
    return sorted((FACES / sub).glob("*.jpg"))[:n]


def _forward_torch(pkg_dir: Path, blobs: list[str], paths: list[str]) -> dict[str, np.ndarray]:
    """Reference: the same preprocessed images straight through convert's torch module."""
    import torch

    from convert import load_package, load_torch
    from extract.pipeline import resolve_preprocess

    pkg = load_package(pkg_dir)
    pp = resolve_preprocess(pkg)
    x = torch.from_numpy(np.stack([pp.load(p) for p in paths]))
    with torch.inference_mode():
        out = load_torch(pkg).eval()(x, blobs=blobs)
    return {b: out[b].reshape(len(paths), -1).numpy() for b in blobs}


def test_det3_cache_equals_direct_forward(models: dict[str, Path], tmp_path: Path) -> None:
    from convert import load_package
    from extract import load_embeddings

    pkg = load_package(models["mtcnn-det3"])
    blobs = ["conv5", "conv5/pre_prelu5"]  # layer prelu5 runs in place on conv5: 256-d after / before it
    assert set(blobs) <= set(pkg.blobs)
    src = tmp_path / "faces"
    for cls in ("female", "male"):
        (src / cls).mkdir(parents=True)
        for p in faces(10, f"gender-data/train/{cls}"):
            (src / cls / p.name).symlink_to(p)
    proc = cli("extract", "--model", str(models["mtcnn-det3"]), "--layer", ",".join(blobs), "--images", str(src),
               "--cache", str(tmp_path / "cache"), "--no-progress", "--batch-size", "7")
    assert "20 computed" in proc.stdout and "0 failed" in proc.stdout
    for blob in blobs:
        X, meta = load_embeddings(tmp_path / "cache", layer=blob)
        assert X.shape == (20, 256) and X.dtype == np.float32
        assert sorted(meta["label"].unique()) == ["female", "male"] and meta["sha256"].str.len().eq(64).all()
        ref = _forward_torch(models["mtcnn-det3"], [blob], list(meta["path"]))[blob]
        np.testing.assert_allclose(X, ref, atol=1e-4, rtol=1e-4)
    # the torch backend gives the same rows (own cache: the key does not include the backend)
    cli("extract", "--model", str(models["mtcnn-det3"]), "--layer", "conv5", "--images", str(src), "--backend", "torch",
        "--cache", str(tmp_path / "cache_torch"), "--no-progress")
    Xt, _ = load_embeddings(tmp_path / "cache_torch", layer="conv5")
    X, _ = load_embeddings(tmp_path / "cache", layer="conv5")
    np.testing.assert_allclose(Xt, X, atol=1e-4, rtol=1e-4)


def test_open_nsfw_pool_from_csv_equals_direct_forward(models: dict[str, Path], tmp_path: Path) -> None:
    from extract import load_embeddings

    labels = pd.read_csv(FACES / "labels.csv")
    rows = labels[labels["split"] == "test"].groupby("task").head(3)
    rows = rows.rename(columns={"file": "image_names"})
    rows.to_csv(tmp_path / "labels.csv", index=False)
    cli("extract", "--model", str(models["open_nsfw"]), "--layer", "pool", "--csv", str(tmp_path / "labels.csv"),
        "--path-column", "image_names", "--root", str(FACES), "--cache", str(tmp_path / "cache"), "--no-progress",
        "--dtype", "float16")
    X, meta = load_embeddings(tmp_path / "cache", layer="pool")
    assert X.shape == (6, 1024) and X.dtype == np.float16
    assert {"task", "split", "gender", "age_group", "age_approx", "path", "sha256"} <= set(meta.columns)
    ref = _forward_torch(models["open_nsfw"], ["pool"], list(meta["path"]))["pool"]
    np.testing.assert_allclose(X.astype(np.float32), ref, atol=2e-3, rtol=2e-3)


def test_list_file_and_failures(models: dict[str, Path], tmp_path: Path) -> None:
    from extract import load_embeddings

    good = faces(6)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    data = good[0].read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    lines = [f"{p} {i % 2}" for i, p in enumerate(good)] + [f"{tmp_path / n} 0" for n in ("zero.jpg", "text.jpg", "trunc.jpg", "gone.jpg")]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    args = ["extract", "--model", str(models["mtcnn-det3"]), "--layer", "conv5", "--list", str(tmp_path / "train.txt"),
            "--cache", str(tmp_path / "cache"), "--no-progress"]
    proc = cli(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "4 failed" in proc.stdout and "failures.csv" in proc.stdout
    fails = pd.read_csv(next((tmp_path / "cache").glob("*/failures.csv")))
    assert dict(zip(fails["path"].map(lambda p: Path(p).name), fails["reason"].str.split(":").str[0])) == {
        "zero.jpg": "empty file", "text.jpg": "not an image", "trunc.jpg": "truncated", "gone.jpg": "missing file"}
    X, meta = load_embeddings(tmp_path / "cache", layer="conv5")
    assert len(X) == 6 and meta["label"].tolist() == [0, 1, 0, 1, 0, 1]
    # a second run loses nothing and computes nothing; fixing the list makes the run clean
    proc = cli(*args, check=False)
    assert proc.returncode == 1 and "6 already cached, 0 computed" in proc.stdout
    (tmp_path / "train.txt").write_text("\n".join(lines[:6]) + "\n")
    assert "0 failed" in cli(*args).stdout
    assert not list((tmp_path / "cache").glob("*/failures.csv"))


def test_sigkill_then_resume_is_exactly_once(models: dict[str, Path], tmp_path: Path) -> None:
    """SIGKILL a CLI run after some shards are committed; the same command then finishes the job."""
    src = tmp_path / "faces"
    src.mkdir()
    for p in faces(40, "age-data/train/young"):
        (src / p.name).symlink_to(p)
    (src / "dup.jpg").symlink_to(faces(1, "age-data/train/young")[0])  # same content, computed once
    cache = tmp_path / "cache"
    args = ["extract", "--model", str(models["open_nsfw"]), "--layer", "pool", "--images", str(src), "--cache", str(cache),
            "--batch-size", "2", "--shard-size", "2", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "cli.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list(cache.glob("*/meta_*.parquet"))) < 3:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    key = next(cache.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in key.glob("meta_*.parquet")}
    done = sum(len(pd.read_parquet(key / n)) for n in before)
    assert 0 < done < 40
    out = cli(*args).stdout
    assert f"{done} already cached, {40 - done} computed" in out
    assert all((key / n).stat().st_mtime_ns == t for n, t in before.items())  # committed shards untouched
    assert not list(key.glob("*.tmp"))
    metas = pd.concat([pd.read_parquet(p) for p in sorted(key.glob("meta_*.parquet"))])
    assert len(metas) == 40 and metas["sha256"].is_unique
    for meta_file in key.glob("meta_*.parquet"):
        sid = meta_file.stem.split("_")[1]
        assert len(np.load(key / f"emb_pool_{sid}.npy")) == len(pd.read_parquet(meta_file))
    from extract import load_embeddings

    X, meta = load_embeddings(cache, layer="pool")
    assert len(X) == 41 and meta["path"].is_unique
    dup = meta.index[meta["path"].str.endswith("dup.jpg")][0]
    orig = meta.index[(meta["sha256"] == meta["sha256"][dup]) & (meta.index != dup)][0]
    np.testing.assert_array_equal(X[dup], X[orig])


def test_loader_needs_neither_convert_nor_torch(models: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "faces"
    src.mkdir()
    for p in faces(5):
        (src / p.name).symlink_to(p)
    cli("extract", "--model", str(models["mtcnn-det3"]), "--layer", "conv5", "--images", str(src), "--cache", str(tmp_path / "c"), "--no-progress")
    code = (
        "import sys\n"
        "for m in ('convert', 'torch', 'onnxruntime', 'PIL', 'tqdm'): sys.modules[m] = None\n"
        "from extract import load_embeddings\n"
        f"X, meta = load_embeddings({str(tmp_path / 'c')!r}, layer='conv5')\n"
        "assert X.shape == (5, 256) and list(meta.columns[:4]) == ['path', 'rel_path', 'source', 'sha256'], meta.columns\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_bad_layer_and_overrides_are_one_line_errors(models: dict[str, Path], tmp_path: Path) -> None:
    base = ["extract", "--model", str(models["mtcnn-det3"]), "--images", str(FACES / "gender-data" / "test"), "--cache", str(tmp_path)]
    proc = cli(*base, "--layer", "prelu5", check=False)  # a layer name, not a blob: the error names the blob
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "conv5" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(*base, "--layer", "conv5", "--crop", "40", check=False)
    assert proc.returncode == 2 and "network takes" in proc.stderr
