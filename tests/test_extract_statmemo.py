"""Fast re-runs: the stat memo keeps a file's sha256 while its stat signature is unchanged, so a
fully cached re-run opens no image; a changed file (even with its size and mtime restored), a
lying memo and a file written moments ago are all hashed again."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import extract.pipeline as pipeline
from extract.cache import load_embeddings
from extract.sources import from_folder
from extract.statmemo import MEMO, StatMemo
from tests.test_extract_units import PP, FakeNet, _images, _writer

OLD = time.time() - 3600  # files an hour old: past the racy window


def _age(root: Path) -> None:
    for p in root.rglob("*.png"):
        os.utime(p, (OLD, OLD))


@pytest.fixture
def counting(monkeypatch):
    """Counts files read for hashing and images decoded."""
    calls = {"hash": 0, "load": 0}
    real_hash, real_load = pipeline.hash_or_reason, pipeline._load_one

    def hash_(path):
        calls["hash"] += 1
        return real_hash(path)

    def load(pp, path, shape, *rest):
        calls["load"] += 1
        return real_load(pp, path, shape, *rest)

    monkeypatch.setattr(pipeline, "hash_or_reason", hash_)
    monkeypatch.setattr(pipeline, "_load_one", load)
    return calls


def _run(tmp_path: Path, net: FakeNet, **kw):
    records = from_folder(tmp_path / "imgs")
    with _writer(tmp_path) as w:
        return pipeline.run_pipeline(records, net, w, PP, batch_size=3, workers=2, progress=False, **kw)


def test_cached_rerun_opens_no_file(tmp_path, counting):
    _age(_images(tmp_path, n=20))  # 21 files, one a duplicate
    first, _ = _run(tmp_path, FakeNet())
    assert first.computed == 20 and counting == {"hash": 21, "load": 20}
    assert len(StatMemo(tmp_path / "cache" / "fake")) == 21

    counting.update(hash=0, load=0)
    net = FakeNet()
    again, _ = _run(tmp_path, net)
    assert (again.cached, again.computed, net.rows) == (20, 0, 0)
    assert counting == {"hash": 8, "load": 0}  # only the spot check reads files
    X, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    assert len(X) == 21 and meta["sha256"].notna().all()

    counting.update(hash=0, load=0)
    _run(tmp_path, FakeNet(), stat_memo=False)  # --rehash
    assert counting == {"hash": 21, "load": 0}


def test_changed_file_with_restored_size_and_mtime_is_rehashed(tmp_path, counting):
    root = _images(tmp_path, n=6)
    victim = root / "cat" / "odd.bmp"  # BMP: pixels can change in place, size unchanged
    Image.fromarray(np.full((24, 24, 3), 40, np.uint8)).save(victim)
    _age(root)
    os.utime(victim, (OLD, OLD))
    _run(tmp_path, FakeNet())
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-300:] = bytes([200]) * 300  # the last rows of pixels
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime moved
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    counting.update(hash=0, load=0)
    res, _ = _run(tmp_path, FakeNet())
    assert res.computed == 1 and counting["load"] == 1
    X, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    row = meta.index[meta["path"] == str(victim)].item()
    assert meta.loc[row, "sha256"] == hashlib.sha256(bytes(data)).hexdigest()
    np.testing.assert_allclose(X[row], FakeNet.expected(PP.load(victim))["mean"][0], rtol=1e-6)


def test_lying_memo_is_caught_by_the_spot_check(tmp_path, counting):
    _age(_images(tmp_path, n=5))
    _run(tmp_path, FakeNet())
    memo_path = tmp_path / "cache" / "fake" / MEMO
    df = pd.read_parquet(memo_path)
    df["sha256"] = df["sha256"].iloc[::-1].to_numpy()  # every file claims another's hash
    df.to_parquet(memo_path, index=False)
    counting.update(hash=0, load=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res, _ = _run(tmp_path, FakeNet())
    assert any("content changed under an unchanged stat signature" in str(w.message) for w in caught)
    assert res.computed == 0 and counting["hash"] >= 6  # spot check, then every file hashed again
    _, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    for path, sha in zip(meta["path"], meta["sha256"]):
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha


def test_just_written_files_are_not_memoised(tmp_path):
    _images(tmp_path, n=3)  # mtime: now
    _run(tmp_path, FakeNet())
    assert len(StatMemo(tmp_path / "cache" / "fake")) == 0
