"""extract/ without a converted model: sources, preprocessing, the cache and resume, with a fake net."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from extract.cache import CacheError, CacheWriter, cache_key, load_embeddings, scan_shards
from extract.pipeline import cache_config, run_pipeline
from extract.preprocess import ImageError, Preprocess, decode
from extract.sources import SourceError, from_csv, from_folder, from_list, load_records

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "testbed" / "faces" / "imdbwiki"
needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"test bed absent: {FACES}")

PP = Preprocess.from_dict({"channel_order": "bgr", "mean": [104, 117, 123], "scale": 1.0, "resize": [20, 20], "crop": 16, "input_size": [16, 16]})


class FakeNet:
    """Deterministic stand-in for a model: per-channel means and a subsampled map; counts rows."""

    name, device, precision = "fake", "cpu", "fp32"

    def __init__(self, fail_after_batches: int | None = None) -> None:
        self.rows = 0
        self.batches = 0
        self.fail_after = fail_after_batches

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt  # as a Ctrl-C mid-run
        self.batches += 1
        self.rows += len(batch)
        return {"mean": batch.mean(axis=(2, 3)), "map/pre_relu": batch[:, :, ::4, ::4]}

    @staticmethod
    def expected(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"mean": x.mean(axis=(1, 2))[None], "map/pre_relu": x[:, ::4, ::4].reshape(1, -1)}


def _images(tmp_path: Path, n: int = 12) -> Path:
    """A small class-per-folder tree of distinct RGB images, plus a duplicate file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for i in range(n):
        cls = root / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + i, 25, 3), dtype=np.uint8)).save(cls / f"{i:02d}.png")
    (root / "dog" / "dup.png").write_bytes((root / "dog" / "00.png").read_bytes())
    return root


def _writer(tmp_path: Path, blobs=("mean", "map/pre_relu"), shard_size: int = 4, **kw) -> CacheWriter:
    config = cache_config("0" * 64, PP, kw.get("dtype", "float32"), kw.get("l2", False), "fp32")
    return CacheWriter(tmp_path / "cache" / "fake" / cache_key(config), config, list(blobs), shard_size=shard_size)


def _extract(tmp_path: Path, records: pd.DataFrame, net: FakeNet, **kw):
    with _writer(tmp_path, **kw) as w:
        return run_pipeline(records, net, w, PP, batch_size=3, workers=2, progress=False)


# -- sources -------------------------------------------------------------------------------


def test_folder_source_labels_from_subfolders(tmp_path: Path) -> None:
    root = _images(tmp_path)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")
    df = from_folder(root)
    assert len(df) == 13 and set(df["label"]) == {"cat", "dog"}
    assert all(os.path.isabs(p) for p in df["path"]) and df["rel_path"].iloc[0] == "cat/01.png"


def test_csv_and_list_sources(tmp_path: Path) -> None:
    root = _images(tmp_path)
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"image_names": ["cat/01.png", "dog/00.png"], "age": [3, 5], "path": ["a", "b"]}).to_csv(csv, index=False)
    df = from_csv(csv, "image_names", root)
    assert list(df.columns) == ["path", "rel_path", "source", "age", "label_path"]
    assert Path(df["path"][0]) == root / "cat" / "01.png"
    with pytest.raises(SourceError, match="no column"):
        from_csv(csv, "nope", root)
    lst = tmp_path / "train.txt"
    lst.write_text("cat/01.png 1\n\n dog/00.png 0\nwith space/x.jpg 2\n")
    df = from_list(lst, root)
    assert df["label"].tolist() == [1, 0, 2] and df["rel_path"][2] == "with space/x.jpg"
    with pytest.raises(SourceError, match="exactly one"):
        load_records(images=str(root), csv=str(csv))


# -- preprocessing -------------------------------------------------------------------------


def test_preprocess_order_matches_numpy_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)  # already at resize size: no resampling
    Image.fromarray(a).save(tmp_path / "a.png")
    x = PP.load(tmp_path / "a.png")
    ref = a[2:18, 2:18, ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
    np.testing.assert_array_equal(x, ref.transpose(2, 0, 1))
    mt = Preprocess.from_dict({"channel_order": "rgb", "mean": [127.5] * 3, "scale": 0.0078125, "resize": [20, 20], "transpose": True})
    y = mt.load(tmp_path / "a.png")
    np.testing.assert_allclose(y, ((a.astype(np.float32) - 127.5) * 0.0078125).transpose(2, 1, 0))
    mean_img = rng.random((3, 20, 20)).astype(np.float32) * 100
    mi = Preprocess.from_dict({"channel_order": "bgr", "resize": [20, 20], "crop": 16}, mean_image=mean_img)
    np.testing.assert_allclose(mi.load(tmp_path / "a.png"), a[2:18, 2:18, ::-1].transpose(2, 0, 1) - mean_img[:, 2:18, 2:18], rtol=1e-6)
    with pytest.raises(ValueError, match="network takes"):
        Preprocess.from_dict({"resize": [20, 20], "crop": 16, "input_size": [20, 20]})


def test_image_modes_and_exif(tmp_path: Path) -> None:
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[:, :6] = (200, 10, 10)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "paltr.png", transparency=0)  # palette index 0 transparent
    Image.fromarray(rgb).save(tmp_path / "a.gif")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "alpha.png")
    Image.fromarray((np.full((8, 12), 40000)).astype(np.uint16)).save(tmp_path / "sixteen.png")
    for name in ("grey.png", "pal.png", "paltr.png", "a.gif", "cmyk.jpg", "alpha.png", "sixteen.png"):
        img = decode(tmp_path / name)
        assert img.dtype == np.uint8 and img.shape == (8, 12, 3), name  # H x W x BGR
        assert decode(tmp_path / name, gray=True).shape == (8, 12), name
    assert decode(tmp_path / "alpha.png").min() == 255  # fully transparent -> white
    assert decode(tmp_path / "sixteen.png")[0, 0, 0] == round(40000 / 65535 * 255)  # scaled, not clipped
    assert abs(int(decode(tmp_path / "cmyk.jpg")[0, 0, 2]) - 200) < 8  # red stays red (BGR)
    assert decode(tmp_path / "a.gif")[0, 0].tolist() == [10, 10, 200]
    pal = decode(tmp_path / "pal.png")
    assert pal[0, 0, 2] > 150 and pal[0, 0, 0] < 50  # palette lookup, in BGR
    assert decode(tmp_path / "paltr.png")[0, -1].tolist() == [255, 255, 255]  # transparent index over white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    assert decode(tmp_path / "rot.jpg").shape == (12, 8, 3)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 600, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", exif=exif.tobytes())
    assert decode(tmp_path / "big.jpg").shape == (600, 800, 3)
    # reduced DCT scale: 1/8 still covers 48 x 64 once rotated (600 x 800 -> 75 x 100)
    assert decode(tmp_path / "big.jpg", reduce_for=lambda h, w: (48, 64)).shape == (75, 100, 3)
    assert decode(tmp_path / "big.jpg", reduce_for=lambda h, w: (200, 200)).shape == (300, 400, 3)


def test_plain_files_decode_as_cv2_imread(tmp_path: Path) -> None:
    """Ordinary 8-bit opaque files: bit-identical to cv2.imread (Caffe's ReadImageToCVMat)."""
    cv2 = pytest.importorskip("cv2")
    a = np.random.default_rng(2).integers(0, 255, (31, 45, 3), dtype=np.uint8)
    for name in ("x.jpg", "x.png", "x.bmp"):
        Image.fromarray(a).save(tmp_path / name)
        for gray, flag in ((False, cv2.IMREAD_COLOR), (True, cv2.IMREAD_GRAYSCALE)):
            np.testing.assert_array_equal(decode(tmp_path / name, gray=gray), cv2.imread(str(tmp_path / name), flag), err_msg=name)
    odd = tmp_path / "ünï cøde #1.jpg"  # any characters: decoded from memory
    odd.write_bytes((tmp_path / "x.jpg").read_bytes())
    np.testing.assert_array_equal(decode(odd), cv2.imread(str(tmp_path / "x.jpg")))


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"hello, not an image", "not an image"), (None, "missing file")],
)
def test_bad_files_raise_image_error(tmp_path: Path, content: bytes | None, reason: str) -> None:
    p = tmp_path / "bad.jpg"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        PP.load(p)


# -- cache, pipeline, resume -----------------------------------------------------------------


def test_pipeline_rows_equal_direct_forward_and_dedupe(tmp_path: Path) -> None:
    records = from_folder(_images(tmp_path))
    net = FakeNet()
    summary, failures = _extract(tmp_path, records, net)
    assert summary.images == 13 and summary.unique == 12 and summary.computed == 12 and net.rows == 12 and not len(failures)
    X, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    assert X.shape == (13, 3) and list(meta["path"]) == list(records["path"]) and set(meta["label"]) == {"cat", "dog"}
    for i in (0, 5, 12):
        np.testing.assert_allclose(X[i], FakeNet.expected(PP.load(meta["path"][i]))["mean"][0], rtol=1e-6)
    Y, _ = load_embeddings(tmp_path / "cache" / "fake", layer="map/pre_relu")
    assert Y.shape == (13, 3 * 4 * 4)
    key_dir = next((tmp_path / "cache" / "fake").iterdir())
    assert (key_dir / "emb_map%2Fpre_relu_000000.npy").exists()
    # second run: nothing recomputed; a renamed file is not recomputed either
    os.rename(records["path"][3], records["path"][3] + ".moved.png")
    net2 = FakeNet()
    summary2, _ = _extract(tmp_path, from_folder(tmp_path / "imgs"), net2)
    assert net2.rows == 0 and summary2.cached == 12


def test_interrupted_run_resumes_exactly_once(tmp_path: Path) -> None:
    records = from_folder(_images(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path, records.copy(), FakeNet(fail_after_batches=2))
    key_dir = next((tmp_path / "cache" / "fake").iterdir())
    done = sum(s["rows"] for s in scan_shards(key_dir))
    assert done == 6  # two batches of 3, flushed on the way out
    # debris of a kill between files: an uncommitted embedding and a temp file
    np.save(key_dir / "emb_mean_000099.npy", np.zeros((2, 3), np.float32))
    (key_dir / "meta_000098.parquet.123.tmp").write_bytes(b"x")
    net = FakeNet()
    summary, _ = _extract(tmp_path, records.copy(), net)
    assert net.rows == 12 - done and summary.cached == done
    assert not (key_dir / "emb_mean_000099.npy").exists() and not list(key_dir.glob("*.tmp"))
    shas = pd.concat([pd.read_parquet(key_dir / s["meta"]) for s in scan_shards(key_dir)])["sha256"]
    assert shas.is_unique and len(shas) == 12
    X, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    assert len(X) == 13 and meta["path"].is_unique


def test_failures_are_listed_and_cache_kept(tmp_path: Path) -> None:
    root = _images(tmp_path)
    _extract(tmp_path, from_folder(root), FakeNet())
    (root / "dog" / "zero.png").write_bytes(b"")
    (root / "dog" / "text.jpg").write_bytes(b"GIF89a nonsense")
    good = (root / "cat" / "01.png").read_bytes()
    (root / "cat" / "trunc.png").write_bytes(good[: len(good) // 2])
    records = from_folder(root)
    missing = records.iloc[:1].assign(path=str(root / "gone.jpg"), rel_path="gone.jpg")
    records = pd.concat([records, missing], ignore_index=True)
    net = FakeNet()
    summary, failures = _extract(tmp_path, records, net)
    assert summary.failed == 4 and net.rows == 0
    reasons = dict(zip(failures["path"].map(lambda p: Path(p).name), failures["reason"]))
    assert reasons["zero.png"] == "empty file" and reasons["gone.jpg"] == "missing file"
    assert reasons["text.jpg"] == "not an image" and reasons["trunc.png"].startswith(("truncated", "corrupt"))
    on_disk = pd.read_csv(summary.failures_path)
    assert list(on_disk.columns) == ["path", "reason"] and len(on_disk) == 4
    X, meta = load_embeddings(tmp_path / "cache" / "fake", layer="mean")
    assert len(X) == 13  # the bad ones are not in the index, the good ones all are


def test_keys_separate_dtype_l2_and_ambiguity_is_explained(tmp_path: Path) -> None:
    records = from_folder(_images(tmp_path))
    _extract(tmp_path, records.copy(), FakeNet())
    _extract(tmp_path, records.copy(), FakeNet(), dtype="float16", l2=True)
    cache = tmp_path / "cache" / "fake"
    assert len(list(cache.iterdir())) == 2
    with pytest.raises(CacheError, match="2 cache keys hold layer 'mean'.*dtype=float16"):
        load_embeddings(cache, layer="mean")
    X16, _ = load_embeddings(cache, layer="mean", dtype="float16")
    assert X16.dtype == np.float16 and np.allclose(np.linalg.norm(X16.astype(np.float32), axis=1), 1, atol=1e-3)
    X32, _ = load_embeddings(cache, layer="mean", l2=False)
    assert X32.dtype == np.float32
    with pytest.raises(CacheError, match="cached layers"):
        load_embeddings(cache, layer="fc7")
    manifest = json.loads(next(p for p in cache.glob("*/manifest.json")).read_text())
    assert manifest["format"] == "graft-cache/1" and set(manifest["blobs"]) == {"mean", "map/pre_relu"}


def test_second_layer_later_only_computes_that_layer(tmp_path: Path) -> None:
    records = from_folder(_images(tmp_path))
    _extract(tmp_path, records.copy(), FakeNet(), blobs=("mean",))
    net = FakeNet()
    _extract(tmp_path, records.copy(), net, blobs=("mean", "map/pre_relu"))
    assert net.rows == 12
    key_dir = next((tmp_path / "cache" / "fake").iterdir())
    for blob in ("mean", "map/pre_relu"):
        X, _ = load_embeddings(key_dir, layer=blob)
        assert len(X) == 13
    assert len(pd.concat([pd.read_parquet(p) for p in key_dir.glob("meta_*.parquet")])) == 24


def test_writer_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    with _writer(tmp_path), pytest.raises(CacheError, match="another extract"):
        _writer(tmp_path)


@needs_faces
def test_faces_decode_fast_path() -> None:
    path = next(FACES.glob("gender-data/train/female/*.jpg"))
    x = Preprocess.from_dict({"resize": [256, 256], "crop": 224, "mean": [104, 117, 123]}).load(path)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32


def test_gray_channel_order(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 10, 3), 100, np.uint8)).save(tmp_path / "g.png")
    pp = Preprocess.from_dict({"channel_order": "gray", "mean": [50], "scale": 0.5, "resize": [8, 8], "crop": 0, "input_size": [8, 8]})
    x = pp.load(tmp_path / "g.png")
    assert x.shape == (1, 8, 8) == pp.input_shape() and np.allclose(x, 25)
