"""Caffe-exact preprocessing: graft's default pixels and open_nsfw features equal OpenCV's
reference pipeline (cv2.imread -> cv2.resize INTER_LINEAR -> centre crop -> blobFromImages ->
cv2.dnn on the original caffemodel) on real test-bed faces; the old PIL mode stays selectable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from extract.cache import cache_key
from extract.pipeline import cache_config
from extract.preprocess import IMPLEMENTATION, RESIZE_FILTERS, Preprocess

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
FACES = TESTBED / "faces" / "imdbwiki"
NSFW = TESTBED / "caffe" / "open_nsfw"
needs_testbed = pytest.mark.skipif(not FACES.is_dir() or not NSFW.is_dir(), reason=f"test bed absent: {TESTBED}")

RECIPE = {"channel_order": "bgr", "mean": [104, 117, 123], "resize": [256, 256], "crop": 224, "input_size": [224, 224]}
OLD = {"resize_filter": "pil-bilinear", "fast_decode": True}
MEAN = (104.0, 117.0, 123.0)


def _opencv_crops(paths: list[Path]) -> list[np.ndarray]:
    """open_nsfw's recipe as every OpenCV tutorial writes it (Caffe's ReadImageToCVMat + crop)."""
    import cv2

    crops = []
    for p in paths:
        img = cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (256, 256), interpolation=cv2.INTER_LINEAR)
        crops.append(img[16:240, 16:240])
    return crops


def _old_pil(path: Path, target: tuple[int, int] = (256, 256), crop: int = 224) -> np.ndarray:
    """graft's preprocessing before cv2-exif/2 (PIL draft + antialiased bilinear), uint8 BGR."""
    img = Image.open(path)
    if img.format == "JPEG":
        img.draft("RGB", (target[1], target[0]))
    img = img.convert("RGB")
    if (img.height, img.width) != target:
        img = img.resize((target[1], target[0]), Image.BILINEAR)
    top, left = (img.height - crop) // 2, (img.width - crop) // 2
    return np.asarray(img)[top : top + crop, left : left + crop, ::-1]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """48 faces, every k-th of the sorted set (most downscaled, some upscaled, some non-square),
    plus one re-saved with an EXIF rotation (the test bed has none)."""
    if not FACES.is_dir():
        pytest.skip(f"test bed absent: {FACES}")
    files = sorted(FACES.rglob("*.jpg"))
    picked = files[:: len(files) // 47][:47]
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    Image.open(picked[0]).crop((0, 0, 200, 150)).save(rotated, exif=exif.tobytes(), quality=95)
    return [*picked, rotated]


@pytest.fixture(scope="module")
def nsfw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """open_nsfw converted with its released recipe (resize 256, crop 224, BGR, mean 104/117/123)."""
    from convert import convert_model
    from convert.preprocess import build_preprocess

    if not NSFW.is_dir():
        pytest.skip(f"test bed absent: {NSFW}")
    spec, _ = build_preprocess([1, 3, 224, 224], mean="104,117,123", resize="256", crop=224, channel_order="bgr")
    out = tmp_path_factory.mktemp("models") / "open_nsfw"
    convert_model(NSFW / "deploy.prototxt", NSFW / "resnet_50_1by2_nsfw.caffemodel", out=out, name="open_nsfw",
                  preprocess=spec, verify=False, log=lambda *a, **k: None)
    return out


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@needs_testbed
def test_default_pixels_equal_opencv_blob(sample: list[Path]) -> None:
    import cv2

    pp = Preprocess.from_dict(RECIPE)
    blob = cv2.dnn.blobFromImages(_opencv_crops(sample), 1.0, (224, 224), MEAN, swapRB=False, crop=False)
    ours = np.stack([pp.load(p) for p in sample])
    assert any(Image.open(p).size[0] > 256 for p in sample) and any(Image.open(p).size[0] < 256 for p in sample)
    np.testing.assert_array_equal(ours, blob)
    uint8 = np.stack([pp.load_uint8(p) for p in sample])
    np.testing.assert_array_equal(pp.normalize(uint8), ours)  # the batch split equals load, bit for bit


@needs_testbed
def test_open_nsfw_pool_matches_opencv_dnn(sample: list[Path], nsfw: Path, tmp_path: Path) -> None:
    import cv2

    from extract import load_embeddings
    from extract.pipeline import extract

    net = cv2.dnn.readNetFromCaffe(str(NSFW / "deploy.prototxt"), str(NSFW / "resnet_50_1by2_nsfw.caffemodel"))
    net.setInput(cv2.dnn.blobFromImages(_opencv_crops(sample), 1.0, (224, 224), MEAN, swapRB=False, crop=False))
    ref = net.forward("pool").reshape(len(sample), -1)
    records = pd.DataFrame({"path": [str(p) for p in sample], "rel_path": [p.name for p in sample], "source": "faces"})
    found = {}
    for mode, overrides in (("default", None), ("old", OLD)):
        summary, _ = extract(nsfw, ["pool"], records, cache=tmp_path / "cache", preprocess=overrides, backend="onnxruntime",
                             device="cpu", progress=False)
        assert summary.failed == 0 and summary.computed == summary.unique  # the faces hold a few duplicates
        X, meta = load_embeddings(Path(summary.cache_dir), layer="pool")
        order = {p: i for i, p in enumerate(meta["path"])}
        found[mode] = _cosines(X[[order[str(p)] for p in sample]], ref)
    print(f"\ncosine vs OpenCV DNN: default mean {found['default'].mean():.7f} min {found['default'].min():.7f}; "
          f"old PIL mode mean {found['old'].mean():.7f} min {found['old'].min():.7f}")
    assert found["default"].mean() >= 0.9999 and found["default"].min() >= 0.999
    assert found["old"].mean() < found["default"].mean()  # the reason the default changed
    assert len([d for d in (tmp_path / "cache").iterdir() if (d / "manifest.json").exists()]) == 2  # never one key


@needs_testbed
def test_old_pil_mode_is_reproduced_exactly(sample: list[Path], tmp_path: Path) -> None:
    new, old = Preprocess.from_dict(RECIPE), Preprocess.from_dict({**RECIPE, **OLD})
    assert cache_key(cache_config("0" * 64, new, "float32", False, "fp32")) != cache_key(cache_config("0" * 64, old, "float32", False, "fp32"))
    assert (old.to_dict()["resize_filter"], old.to_dict()["fast_decode"]) == ("pil-bilinear", True)
    differ = 0
    for p in sample[:-1]:
        np.testing.assert_array_equal(old.load_uint8(p), _old_pil(p), err_msg=str(p))
        differ += not np.array_equal(old.load_uint8(p), new.load_uint8(p))
    assert differ > len(sample) // 2
    big = tmp_path / "big.jpg"  # big enough for draft / the reduced DCT scale to apply (1/4)
    Image.open(sample[0]).resize((1100, 1030), Image.BICUBIC).save(big, quality=90)
    np.testing.assert_array_equal(old.load_uint8(big), _old_pil(big))
    full = Preprocess.from_dict({**RECIPE, "fast_decode": False, "resize_filter": "pil-bilinear"})
    assert not np.array_equal(full.load_uint8(big), old.load_uint8(big))


def test_shorter_side_keeps_the_aspect(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(3)
    a = cv2.GaussianBlur(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8), (7, 7), 2)  # H 200, W 300
    cv2.imwrite(str(tmp_path / "wide.png"), a)
    pp = Preprocess.from_dict({**RECIPE, "resize_mode": "shorter-side"})
    got = pp.load_uint8(tmp_path / "wide.png")
    wide = cv2.resize(a, (384, 256), interpolation=cv2.INTER_LINEAR)  # shorter side 200 -> 256, 300 -> 384
    np.testing.assert_array_equal(got, wide[16:240, 80:304])  # torchvision Resize(256) + CenterCrop(224)
    squash = Preprocess.from_dict(RECIPE).load_uint8(tmp_path / "wide.png")
    assert got.shape == squash.shape == (224, 224, 3) and not np.array_equal(got, squash)
    # H, W given: cover both, then the centre; the result always has the target size
    tall = Preprocess.from_dict({"resize": [100, 50], "resize_mode": "shorter-side", "input_size": [100, 50]})
    assert tall.resized_size(200, 300) == (100, 150) and tall.load_uint8(tmp_path / "wide.png").shape == (100, 50, 3)
    assert tall.resized_size(300, 100) == (150, 50)


@pytest.mark.parametrize("resize_filter", sorted(RESIZE_FILTERS))
def test_every_filter_and_the_batch_split(tmp_path: Path, resize_filter: str) -> None:
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (41, 37, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    mean_img = rng.random((3, 24, 24)).astype(np.float32) * 50
    for d, mi in (({"channel_order": "rgb", "mean": [127.5], "scale": 0.0078125, "resize": 24, "transpose": True}, None),
                  ({"channel_order": "bgr", "resize": [28, 30], "crop": 24}, mean_img),
                  ({"channel_order": "gray", "mean": [50], "resize": 20, "crop": 16}, None)):
        pp = Preprocess.from_dict({**d, "resize_filter": resize_filter}, mean_image=mi)
        u = pp.load_uint8(tmp_path / "a.png")
        assert u.dtype == np.uint8 and u.shape == (*pp.output_size(), pp.channels)
        x = pp.load(tmp_path / "a.png")
        assert x.shape == pp.input_shape()
        np.testing.assert_array_equal(x, pp.normalize(u[None])[0])
        np.testing.assert_array_equal(pp.normalize(np.stack([u, u[::-1]]))[0], x)


def test_option_values_are_checked_and_keyed() -> None:
    for key, bad in (("resize_filter", "nearest"), ("resize_mode", "fit")):
        with pytest.raises(ValueError, match=f"^{key} must be one of .*, got '{bad}'$"):
            Preprocess.from_dict({**RECIPE, key: bad})
    d = Preprocess.from_dict(RECIPE).to_dict()
    assert (d["resize_filter"], d["fast_decode"], d["resize_mode"], d["implementation"]) == ("linear", False, "squash", IMPLEMENTATION)


def test_cli_flags_reach_the_preprocessing() -> None:
    from types import SimpleNamespace

    from cli import build_parser
    from extract.pipeline import resolve_preprocess

    argv = ["extract", "--model", "m", "--layer", "pool", "--images", ".", "--resize-filter", "pil-bilinear", "--fast-decode",
            "--resize-mode", "shorter-side"]
    args = build_parser(argv).parse_args(argv)
    assert (args.resize_filter, args.fast_decode, args.resize_mode) == ("pil-bilinear", True, "shorter-side")
    assert build_parser(argv[:7]).parse_args(argv[:7]).fast_decode is None  # not given: the package's value
    pkg = SimpleNamespace(preprocess={**RECIPE, "resize_filter": "area"}, input_shape=[None, 3, 224, 224], dir=".")
    pp = resolve_preprocess(pkg, {"resize_filter": None, "fast_decode": True, "resize_mode": "shorter-side"})
    assert (pp.resize_filter, pp.fast_decode, pp.resize_mode) == ("area", True, "shorter-side")
