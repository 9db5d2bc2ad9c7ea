"""Datasets apart from the embedding store (issue: predict added its images to the training data).

The scenario, end to end through the CLI on real faces and a real Caffe net (MTCNN det3):
extract a class-per-folder train set, fit a head, predict a class-per-folder test folder,
refit: the refit trains on exactly the same rows. Plus the rules around it: names derived from
the input, a derived name taken by another input is refused, ``--dataset`` chooses, and an old
cache's single ``index.parquet`` still loads.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
GENDER = TESTBED / "faces" / "imdbwiki" / "gender-data"

pytestmark = pytest.mark.skipif(not DET3.is_dir() or not GENDER.is_dir(), reason=f"test bed absent: {TESTBED}")


def _subset(src: Path, dst: Path, per_class: int) -> Path:
    """A class-per-folder copy (symlinks) of the first ``per_class`` faces of each class of ``src``."""
    for cls in ("female", "male"):
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            os.symlink(f, dst / cls / f.name)
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from convert import convert_model
    from convert.preprocess import build_preprocess

    tmp = tmp_path_factory.mktemp("datasets")
    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", tmp / "det3", "det3", preprocess=pre, log=lambda _m: None)
    train = _subset(GENDER / "train", tmp / "faces" / "train", 12)
    test = _subset(GENDER / "test", tmp / "faces" / "test", 5)
    return {"tmp": tmp, "pkg": tmp / "det3", "train": train, "test": test, "cache": tmp / "cache"}


def _cli(*argv: str) -> int:
    import cli

    return cli.main([*argv])


def _fit(world, out: str, *extra: str) -> dict:
    rc = _cli("fit-head", "--cache", str(world["cache"]), "--layer", "conv5", "--label-column", "label", "--kind",
              "classification", "--head", "logreg", "--cv", "3", "--no-learning-curve", "--no-plots", "--quiet",
              "--out", str(world["tmp"] / out), *extra)
    assert rc == 0
    return json.loads((world["tmp"] / out / "card.json").read_text())


def test_predict_never_joins_the_training_set(world, capsys):
    from extract import load_embeddings

    common = ["--model", str(world["pkg"]), "--layer", "conv5", "--cache", str(world["cache"]), "--no-progress"]
    assert _cli("extract", *common, "--images", str(world["train"])) == 0
    assert "dataset: train" in capsys.readouterr().out
    first = _fit(world, "h1")
    n_first = first["split"]["n_train"] + first["split"]["n_test"]
    assert n_first == 24 and first["cache"]["dataset"]["name"] == "train"

    out = world["tmp"] / "pred.csv"
    assert _cli("predict", "--head", str(world["tmp"] / "h1"), "--images", str(world["test"]), "--cache",
                str(world["cache"]), "--out", str(out), "--no-progress") == 0
    assert len(pd.read_csv(out)) == 10

    again = _fit(world, "h2")  # the default is still the extracted train set, not predict's images
    assert again["split"]["n_train"] + again["split"]["n_test"] == n_first
    assert again["cache"]["dataset"]["name"] == "train"
    X, meta = load_embeddings(world["cache"], layer="conv5")
    assert len(X) == 24 and meta.attrs["dataset"] == "train"
    assert not meta["path"].str.contains("/test/").any()

    Xp, mp = load_embeddings(world["cache"], layer="conv5", dataset="predict-test")  # predict's own dataset
    assert len(Xp) == 10 and mp["path"].str.contains("/test/").all()

    # an explicit extract of the test folder is its own dataset; --dataset picks either
    assert _cli("extract", *common, "--images", str(world["test"])) == 0
    _, mt = load_embeddings(world["cache"], layer="conv5")
    assert mt.attrs["dataset"] == "test" and len(mt) == 10  # most recently extracted
    chosen = _fit(world, "h3", "--dataset", "train")
    assert chosen["split"]["n_train"] + chosen["split"]["n_test"] == n_first


def test_dataset_names_are_checked(world, capsys):
    from extract.cache import list_datasets

    common = ["--model", str(world["pkg"]), "--layer", "conv5", "--cache", str(world["cache"]), "--no-progress"]
    other = _subset(GENDER / "test", world["tmp"] / "elsewhere" / "train", 2)  # another folder called train
    assert _cli("extract", *common, "--images", str(world["train"])) == 0
    capsys.readouterr()
    assert _cli("extract", *common, "--images", str(other)) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset 'train'" in err and "--dataset NAME" in err and "\n" not in err
    assert _cli("extract", *common, "--images", str(other), "--dataset", "train-b") == 0
    assert _cli("extract", *common, "--images", str(other), "--dataset", "../x") == 2
    assert "--dataset '../x'" in capsys.readouterr().err
    key = next(p for p in world["cache"].iterdir() if (p / "manifest.json").exists())
    ds = list_datasets(key)
    assert ds["train"]["rows"] == 24 and ds["train-b"]["rows"] == 4 and ds["train"]["source"] == str(world["train"])
    assert (key / "datasets" / "train-b.parquet").exists()
    assert _cli("fit-head", "--cache", str(world["cache"]), "--layer", "conv5", "--task", "gender", "--dataset", "nope") == 2
    assert "no dataset 'nope'" in capsys.readouterr().err


def test_old_single_index_still_loads(world, tmp_path):
    """A key folder written before datasets: one index.parquet, no datasets/ (and the heads read it)."""
    from extract import load_embeddings

    common = ["--model", str(world["pkg"]), "--layer", "conv5", "--cache", str(tmp_path / "c"), "--no-progress"]
    assert _cli("extract", *common, "--images", str(world["train"])) == 0
    key = next(p for p in (tmp_path / "c").iterdir() if (p / "manifest.json").exists())
    shutil.move(key / "datasets" / "train.parquet", key / "index.parquet")
    (key / "datasets").rmdir()
    man = json.loads((key / "manifest.json").read_text())
    man.pop("datasets")
    man["index"] = "index.parquet"
    (key / "manifest.json").write_text(json.dumps(man))
    X, meta = load_embeddings(tmp_path / "c", layer="conv5")
    assert len(X) == 24 and meta.attrs["dataset"] == "index" and set(meta["label"]) == {"female", "male"}
    world2 = dict(world, cache=tmp_path / "c", tmp=tmp_path)
    card = _fit(world2, "h")
    assert card["cache"]["dataset"]["name"] == "index"


def test_artifacts_root_moves_everything_and_fit_head_model_reads_its_cache(world, tmp_path, monkeypatch):
    """GRAFT_ARTIFACTS moves models too; a package converted from a generic `deploy.prototxt` is
    named after its caffemodel; `fit-head --model DIR` reads the cache `extract --model DIR` wrote."""
    root = tmp_path / "art"
    monkeypatch.setenv("GRAFT_ARTIFACTS", str(root))
    proto = tmp_path / "deploy.prototxt"
    shutil.copy(DET3 / "det3.prototxt", proto)
    assert _cli("convert", "--prototxt", str(proto), "--caffemodel", str(DET3 / "det3.caffemodel"), "--mean", "127.5",
                "--scale", "0.0078125", "--channel-order", "rgb") == 0
    pkg = root / "models" / "det3"
    assert (pkg / "manifest.json").exists() and json.loads((pkg / "manifest.json").read_text())["name"] == "det3"
    assert _cli("extract", "--model", "det3", "--layer", "conv5", "--images", str(world["train"]), "--no-progress") == 0
    assert (root / "cache" / "det3").is_dir()
    assert _cli("fit-head", "--model", str(pkg), "--layer", "conv5", "--label-column", "label", "--kind", "classification",
                "--head", "ridge", "--cv", "3", "--no-learning-curve", "--no-plots", "--quiet") == 0
    heads = list((root / "heads").iterdir())
    assert [h.name for h in heads] == ["label-det3-conv5"]
