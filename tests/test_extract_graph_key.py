"""Cache keys and heads know the graph, not only the weights (issue: keys that know the graph).

The scenario: the same caffemodel reconverted with a corrected prototxt into the same package
(here MTCNN det3 with its first MAX pooling made AVE: same blobs, another net). Extracting
again must recompute, not serve the old net's features, and a head fitted on the old net's
features must refuse the new ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
FACES = TESTBED / "faces" / "imdbwiki" / "gender-data" / "train"

pytestmark = pytest.mark.skipif(not DET3.is_dir() or not FACES.is_dir(), reason=f"test bed absent: {TESTBED}")

PRE = {"channel_order": "rgb", "mean": [127.5] * 3, "scale": 0.0078125}


def convert(prototxt: Path, out: Path):
    from convert import convert_model
    from convert.preprocess import build_preprocess

    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    return convert_model(prototxt, DET3 / "det3.caffemodel", out, "det3", preprocess=pre, log=lambda _m: None)


def records(n: int = 6):
    from extract.sources import from_folder

    return from_folder(FACES).groupby("label").head(n // 2).reset_index(drop=True)


def test_reconverted_graph_recomputes_and_old_heads_refuse_it(tmp_path):
    from extract import load_embeddings
    from extract.pipeline import extract
    from heads.persist import check_card

    pkg_dir, cache = tmp_path / "det3", tmp_path / "cache"
    first = convert(DET3 / "det3.prototxt", pkg_dir)
    summary, _ = extract(pkg_dir, ["conv5"], records(), cache=cache, progress=False)
    assert summary.computed == 6
    X_old, _ = load_embeddings(summary.cache_dir, layer="conv5")

    text = (DET3 / "det3.prototxt").read_text()
    assert "pool: MAX" in text
    fixed = tmp_path / "det3-fixed.prototxt"
    fixed.write_text(text.replace("pool: MAX", "pool: AVE", 1))
    second = convert(fixed, pkg_dir)  # same caffemodel, same package folder
    assert second.weights_sha256 == first.weights_sha256
    assert second.graph_sha256 != first.graph_sha256

    again, _ = extract(pkg_dir, ["conv5"], records(), cache=cache, progress=False)
    assert again.computed == 6, "the new graph's features must be computed, not served from the old key"
    assert again.cache_dir != summary.cache_dir
    X_new, _ = load_embeddings(again.cache_dir, layer="conv5")
    assert np.abs(X_new - X_old).max() > 1e-3

    import json

    old_cfg = json.loads((Path(summary.cache_dir) / "manifest.json").read_text())["config"]
    new_cfg = json.loads((Path(again.cache_dir) / "manifest.json").read_text())["config"]
    card = {"layer": "conv5", "model": {"weights_sha256": first.weights_sha256}, "cache": {"config": old_cfg}}
    diffs = check_card(card, weights_sha256=second.weights_sha256, layer="conv5", cache_config=new_cfg)
    assert any("graph" in d for d in diffs), diffs
    assert check_card(card, layer="conv5", cache_config=old_cfg) == []


def test_old_packages_and_heads_still_work(tmp_path):
    """A package written before graph_sha256 was recorded gets the same identity from its
    deploy.prototxt; a head card without it is not a mismatch."""
    import json

    from convert import load_package
    from heads.persist import check_card

    pkg = convert(DET3 / "det3.prototxt", tmp_path / "det3")
    recorded = pkg.graph_sha256
    m = json.loads((pkg.dir / "manifest.json").read_text())
    del m["graph_sha256"]
    (pkg.dir / "manifest.json").write_text(json.dumps(m))
    assert load_package(pkg.dir).graph_sha256 == recorded
    old_card = {"layer": "conv5", "cache": {"config": {"dtype": "float32"}}}
    assert check_card(old_card, layer="conv5", cache_config={"dtype": "float32", "graph_sha256": recorded}) == []


def _folder(root: Path, sub: str, n: int) -> Path:
    """n faces per class of ``sub`` (gender-data/train or /test) as class folders of symlinks."""
    for cls in ("female", "male"):
        (root / cls).mkdir(parents=True)
        for p in sorted((FACES.parent.parent / "gender-data" / sub / cls).glob("*.jpg"))[:n]:
            (root / cls / p.name).symlink_to(p)
    return root


def test_predict_never_adds_its_images_to_the_training_data(tmp_path):
    """Extract a class-per-folder train set, fit, predict a class-per-folder test folder, refit:
    the refit must see the same training rows (predict stores embeddings, not index rows)."""
    from extract import load_embeddings
    from extract.pipeline import extract
    from extract.sources import from_folder
    from heads.fit import fit_head_from_cache
    from heads.predict import predict_images
    from heads.tasks import resolve_task

    pkg_dir, cache = tmp_path / "det3", tmp_path / "cache"
    convert(DET3 / "det3.prototxt", pkg_dir)
    train = _folder(tmp_path / "train", "train", 12)
    test = _folder(tmp_path / "test", "test", 5)
    extract(pkg_dir, ["conv5"], from_folder(train), cache=cache, progress=False)
    task = resolve_task(None, label_column="label", kind="classification")
    kw = dict(model=str(pkg_dir), layer="conv5", cache=str(cache), head=["ridge"], cv=3, with_learning_curve=False)
    first = fit_head_from_cache(task, out=tmp_path / "head", **kw)
    X0, meta0 = load_embeddings(cache, layer="conv5")
    assert len(meta0) == 24

    res = predict_images(tmp_path / "head", images=str(test), cache=str(cache), progress=False)
    assert len(res) == 10 and (res["error"] == "").all(), res[res["error"] != ""]

    X1, meta1 = load_embeddings(cache, layer="conv5")
    assert sorted(meta1["path"]) == sorted(meta0["path"]), "predict's images joined the training data"
    refit = fit_head_from_cache(task, out=tmp_path / "head2", **kw)
    n = lambda r: r.card["split"]["n_train"] + r.card["split"]["n_test"]  # noqa: E731
    assert n(first) == n(refit) == 24
