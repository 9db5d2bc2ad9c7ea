"""``iter_embeddings``: load_embeddings' rows, in its order, in chunks of bounded memory.

Real caches: MTCNN det3 converted, real faces extracted through the CLI into several small
shards, then a second extract (another dataset) that reuses cached rows, adds new shards and
holds one image under two paths, so a dataset's rows come from shards out of order. A
synthetic key folder written with ``CacheWriter`` (20k x 512 float32) checks the memory bound.
"""

from __future__ import annotations

import os
import shutil
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
GENDER = TESTBED / "faces" / "imdbwiki" / "gender-data"

needs_testbed = pytest.mark.skipif(not DET3.is_dir() or not GENDER.is_dir(), reason=f"test bed absent: {TESTBED}")


def _link(files: list[Path], dst: Path, names: list[str] | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f, n in zip(files, names or [f.name for f in files]):
        os.symlink(f, dst / n)


def _extract(pkg: Path, cache: Path, images: Path, *extra: str) -> None:
    import cli

    assert cli.main(["extract", "--model", str(pkg), "--layer", "conv5", "--cache", str(cache), "--images", str(images),
                     "--shard-size", "7", "--no-progress", *extra]) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """det3, a 24-face dataset ``train`` (3 shards: a shard is cut at the first batch past 7 rows), then a dataset ``other`` that
    shares 8 of those faces, adds 8 new ones (a new shard) and holds one face under two paths."""
    if not DET3.is_dir() or not GENDER.is_dir():
        pytest.skip(f"test bed absent: {TESTBED}")
    from convert import convert_model
    from convert.preprocess import build_preprocess

    tmp = tmp_path_factory.mktemp("iter")
    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", tmp / "det3", "det3", preprocess=pre, log=lambda _m: None)
    faces = {c: sorted((GENDER / "train" / c).iterdir()) for c in ("female", "male")}
    for c in faces:
        _link(faces[c][:12], tmp / "train" / c)
        _link(faces[c][8:16], tmp / "other" / c)
    _link([faces["female"][9]], tmp / "other" / "male", ["same-face-other-path.jpg"])
    cache = tmp / "cache"
    _extract(tmp / "det3", cache, tmp / "train")
    _extract(tmp / "det3", cache, tmp / "other")
    key = next(p for p in cache.iterdir() if (p / "manifest.json").exists())
    return {"tmp": tmp, "pkg": tmp / "det3", "cache": cache, "key": key}


def _joined(chunks: list[tuple[np.ndarray, pd.DataFrame]]) -> tuple[np.ndarray, pd.DataFrame]:
    return np.concatenate([x for x, _ in chunks]), pd.concat([m for _, m in chunks])


def _assert_same(chunks: list[tuple[np.ndarray, pd.DataFrame]], X: np.ndarray, meta: pd.DataFrame, batch_size: int) -> None:
    assert chunks, "no chunk"
    assert all(0 < len(x) == len(m) <= batch_size for x, m in chunks)
    assert all(len(x) == batch_size for x, _ in chunks[:-1])  # full chunks but the last
    assert all(isinstance(x, np.ndarray) and not isinstance(x, np.memmap) and x.dtype == X.dtype for x, _ in chunks)
    assert all(m.attrs["dataset"] == meta.attrs["dataset"] for _, m in chunks)
    Xi, mi = _joined(chunks)
    assert Xi.dtype == X.dtype and np.array_equal(Xi, np.asarray(X))
    pd.testing.assert_frame_equal(mi, meta)


@needs_testbed
def test_the_cache_is_non_trivial(world):
    from extract import load_embeddings
    from extract.cache import scan_shards

    assert len(scan_shards(world["key"])) >= 4  # train in 3, other's new faces in 1
    _, meta = load_embeddings(world["cache"], "conv5", dataset="other")
    assert len(meta) == 17 and meta["sha256"].duplicated().sum() == 1


@needs_testbed
@pytest.mark.parametrize("dataset", [None, "train", "other"])
@pytest.mark.parametrize("batch_size", [1, 5, 7, 1000])
def test_chunks_are_load_embeddings(world, dataset, batch_size):
    from extract import iter_embeddings, load_embeddings

    X, meta = load_embeddings(world["cache"], "conv5", dataset=dataset)
    chunks = list(iter_embeddings(world["cache"], "conv5", batch_size=batch_size, dataset=dataset))
    _assert_same(chunks, X, meta, batch_size)
    assert meta.attrs["dataset"] == (dataset or "other")
    if batch_size == 5:
        assert [m.index[0] for _, m in chunks] == list(range(0, len(meta), 5))


@needs_testbed
def test_layer_defaults_and_key_folder(world):
    from extract import iter_embeddings, load_embeddings

    X, meta = load_embeddings(world["key"])
    _assert_same(list(iter_embeddings(world["key"], batch_size=4)), X, meta, 4)


@pytest.fixture()
def key_copy(world, tmp_path) -> Path:
    dst = tmp_path / "cache" / world["key"].name
    shutil.copytree(world["key"], dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@needs_testbed
@pytest.mark.parametrize("batch_size", [1, 6, 100])
def test_no_dataset_falls_back_to_every_cached_image(key_copy, batch_size):
    from extract import iter_embeddings, load_embeddings

    shutil.rmtree(key_copy / "datasets")
    X, meta = load_embeddings(key_copy, "conv5")
    assert meta.attrs["dataset"] is None and len(meta) == 32 and not meta["sha256"].duplicated().any()
    _assert_same(list(iter_embeddings(key_copy, "conv5", batch_size=batch_size)), X, meta, batch_size)


@needs_testbed
@pytest.mark.parametrize("batch_size", [3, 100])
def test_rows_without_an_embedding_warn_and_are_dropped_alike(key_copy, batch_size):
    from extract import iter_embeddings, load_embeddings
    from extract.cache import scan_shards

    gone = scan_shards(key_copy)[1]  # a shard of train: rows in the middle of both datasets lose their embedding
    (key_copy / gone["meta"]).unlink()
    for dataset in ("train", "other"):
        with pytest.warns(UserWarning, match="have no 'conv5' embedding") as w1:
            X, meta = load_embeddings(key_copy, "conv5", dataset=dataset)
        with pytest.warns(UserWarning, match="have no 'conv5' embedding") as w2:
            chunks = list(iter_embeddings(key_copy, "conv5", batch_size=batch_size, dataset=dataset))
        assert [str(w.message) for w in w1] == [str(w.message) for w in w2]
        assert len(meta) < pq.read_metadata(key_copy / "datasets" / f"{dataset}.parquet").num_rows
        _assert_same(chunks, X, meta, batch_size)


@needs_testbed
def test_errors_are_load_embeddings_errors(world, tmp_path):
    from extract import CacheError, iter_embeddings, load_embeddings

    cache = tmp_path / "two"
    shutil.copytree(world["cache"], cache)
    for p in cache.rglob(".lock"):
        p.unlink()
    _extract(world["pkg"], cache, world["tmp"] / "train", "--dtype", "float16")  # a second key holding conv5
    calls = [dict(layer="nope"), dict(layer="conv5"), dict(layer="conv5", dataset="nope", key=world["key"].name),
             dict(layer="conv5", key="no-such-key")]
    for kw in calls:
        with pytest.raises(CacheError) as e1:
            load_embeddings(cache, **kw)
        with pytest.raises(CacheError) as e2:
            iter_embeddings(cache, **kw)  # raised at the call, before the first chunk
        assert str(e1.value) == str(e2.value)
    X, meta = load_embeddings(cache, "conv5", dtype="float16")
    _assert_same(list(iter_embeddings(cache, "conv5", dtype="float16", batch_size=10)), X, meta, 10)
    with pytest.raises(ValueError, match="batch_size"):
        iter_embeddings(cache, "conv5", dtype="float16", batch_size=0)


def test_a_row_in_two_shards_is_read_from_the_first(tmp_path):
    """Two racing writers can leave one image in two shards: both readers take its first shard's row."""
    from extract import iter_embeddings, load_embeddings
    from extract.cache import CacheWriter

    key = tmp_path / "k"
    shas = [f"{i:064x}" for i in range(9)]
    rng = np.random.default_rng(1)
    with CacheWriter(key, {"dtype": "float16"}, ["fc"], shard_size=4) as w:
        w.add(shas, [f"p{i}" for i in range(9)], {"fc": rng.standard_normal((9, 3))})
        w.flush()
    np.save(key / "emb_fc_000007.npy", rng.standard_normal((2, 3)).astype(np.float16))  # rows 5, 1 again, other numbers
    pd.DataFrame({"sha256": pd.array([shas[5], shas[1]], dtype="string"),  # as CacheWriter writes its metas
                  "path": pd.array(["again5", "again1"], dtype="string")}).to_parquet(key / "meta_000007.parquet")
    for bs in (1, 2, 50):
        X, meta = load_embeddings(key, "fc")
        _assert_same(list(iter_embeddings(key, "fc", batch_size=bs)), X, meta, bs)
        assert len(meta) == 9 and not meta["path"].str.startswith("again").any()


def test_import_stays_light():
    import subprocess
    import sys

    code = "import sys; from extract import iter_embeddings; print(any(m in sys.modules for m in ('torch', 'convert')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# memory


ROWS, DIM = 20_000, 512


@pytest.fixture(scope="module")
def big_key(tmp_path_factory) -> Path:
    """20k x 512 float32 (41 MB) in 5 shards, and a dataset listing them shuffled (so
    load_embeddings gathers a full in-memory copy rather than returning one shard's memmap)."""
    from extract.cache import CacheWriter

    key = tmp_path_factory.mktemp("big") / "float32-fp32-synthetic"
    rng = np.random.default_rng(0)
    shas = [f"{i:064x}" for i in range(ROWS)]
    paths = [f"img/{i}.jpg" for i in range(ROWS)]
    with CacheWriter(key, {"dtype": "float32"}, ["fc"], shard_size=4096) as w:
        for lo in range(0, ROWS, 4096):
            w.add(shas[lo:lo + 4096], paths[lo:lo + 4096], {"fc": rng.standard_normal((min(4096, ROWS - lo), DIM), np.float32)})
        w.flush()
        order = rng.permutation(ROWS)
        w.write_dataset("all", pd.DataFrame({"path": [paths[i] for i in order], "sha256": [shas[i] for i in order],
                                             "label": order % 2}), [])
    return key


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded(big_key):
    from extract import iter_embeddings, load_embeddings

    full = ROWS * DIM * 4
    seen = {"rows": 0, "sum": 0.0}

    def stream() -> None:
        for X, meta in iter_embeddings(big_key, "fc", batch_size=1000):
            seen["rows"] += len(X)
            seen["sum"] += float(X[:, 0].sum())
            del X, meta

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streamed = _peak(stream)
    loaded = _peak(lambda: load_embeddings(big_key, "fc"))
    X, _ = load_embeddings(big_key, "fc")
    assert seen["rows"] == ROWS and np.isclose(seen["sum"], float(X[:, 0].sum(dtype=np.float64)), rtol=1e-4)
    assert loaded >= 0.95 * full, f"load_embeddings peaked at {loaded / 1e6:.1f} MB: the test does not measure"
    assert streamed < 0.25 * full, f"iter_embeddings peaked at {streamed / 1e6:.1f} MB of {full / 1e6:.1f} MB"


# --------------------------------------------------------------------------------------------
# fit-head's memory guard


def _fit_head(world, out: Path, capsys) -> tuple[int, str]:
    import cli

    capsys.readouterr()
    rc = cli.main(["fit-head", "--cache", str(world["cache"]), "--layer", "conv5", "--dataset", "train", "--label-column",
                   "label", "--kind", "classification", "--head", "logreg", "--cv", "3", "--no-learning-curve",
                   "--no-plots", "--quiet", "--out", str(out)])
    return rc, capsys.readouterr().err


@needs_testbed
def test_fit_head_refuses_more_rows_than_memory(world, tmp_path, monkeypatch, capsys):
    from heads.memory import FIT_COPIES

    monkeypatch.setenv("GRAFT_MEMORY_LIMIT", "64K")
    rc, err = _fit_head(world, tmp_path / "head", capsys)
    lines = err.strip("\n").splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    need = 24 * 256 * 4 * FIT_COPIES / 1024
    for needle in ("24 rows", "256 dims", f"{need:.1f} KiB", "64.0 KiB", "GRAFT_MEMORY_LIMIT", "iter_embeddings"):
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "head").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("head")]  # no temp folder left either


@needs_testbed
@pytest.mark.parametrize("limit", [None, "2G"])
def test_fit_head_of_normal_size_is_unaffected(world, tmp_path, monkeypatch, capsys, limit):
    if limit is None:
        monkeypatch.delenv("GRAFT_MEMORY_LIMIT", raising=False)
    else:
        monkeypatch.setenv("GRAFT_MEMORY_LIMIT", limit)
    rc, err = _fit_head(world, tmp_path / "head", capsys)
    assert rc == 0, err
    assert (tmp_path / "head" / "card.json").exists()


@needs_testbed
def test_bad_memory_limit_is_one_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRAFT_MEMORY_LIMIT", "lots")
    rc, err = _fit_head(world, tmp_path / "head", capsys)
    assert rc == 2 and err.count("\n") == 1 and "GRAFT_MEMORY_LIMIT='lots'" in err, err


@pytest.mark.parametrize(("text", "value"), [("123", 123), ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", 3 * 2**29),
                                             ("64k", 65536), (" 10 MB ", 10 * 2**20)])
def test_parse_bytes(text, value):
    from heads.memory import parse_bytes

    assert parse_bytes(text) == value


def test_available_memory_is_the_os_figure_without_the_variable(monkeypatch):
    from heads.memory import available_memory

    monkeypatch.delenv("GRAFT_MEMORY_LIMIT", raising=False)
    avail = available_memory()
    assert avail is None or avail > 0
    monkeypatch.setenv("GRAFT_MEMORY_LIMIT", "3G")
    assert available_memory() == 3 * 2**30
