"""Reduced precision checks itself: every reduced-precision run computes its first batch in fp32
too, records the per-blob cosine in the cache manifest, and refuses below 0.999 (naming the
blob and the cosine) before anything is stored. Tested on CPU with torch's CPU autocast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
FACES = TESTBED / "faces" / "imdbwiki" / "gender-data" / "train"

pytestmark = pytest.mark.skipif(not DET3.is_dir() or not FACES.is_dir(), reason=f"test bed absent: {TESTBED}")

LRN_NET = """name: "lrn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "norm" type: "LRN" bottom: "conv" top: "norm" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
"""


def test_bf16_run_records_its_cosine_to_fp32(tmp_path):
    from convert import convert_model
    from convert.preprocess import build_preprocess
    from extract.pipeline import extract
    from extract.sources import from_folder

    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", tmp_path / "det3", "det3", preprocess=pre,
                  log=lambda _m: None)
    records = from_folder(FACES).groupby("label").head(3).reset_index(drop=True)
    summary, _ = extract(tmp_path / "det3", ["conv5", "prob1"], records, cache=tmp_path / "cache", backend="torch",
                         device="cpu", precision="bf16", progress=False)
    assert summary.precision == "bf16" and summary.computed == 6
    manifest = json.loads((Path(summary.cache_dir) / "manifest.json").read_text())
    assert manifest["config"]["precision"] == "bf16"
    check = manifest["runs"][-1]["precision_check"]
    assert set(check) == {"conv5", "prob1"} and min(check.values()) >= 0.999, check


def test_fp16_lrn_on_large_activations_is_refused(tmp_path):
    """LRN squares its input: activations past 256 overflow fp16, and the features are wrong."""
    from convert import convert_model
    from convert.generate import generate_caffemodel
    from extract.backends import BackendError, TorchBackend
    from extract.pipeline import check_precision

    proto = tmp_path / "lrn.prototxt"
    proto.write_text(LRN_NET)
    pkg = convert_model(proto, generate_caffemodel(proto, tmp_path / "lrn.caffemodel", seed=0), tmp_path / "pkg", "lrn",
                        log=lambda _m: None)
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 16, 16)).astype(np.float32) * 40  # activations in the thousands
    fp16 = TorchBackend(pkg, ["conv", "norm"], device="cpu", precision="fp16")
    with pytest.raises(BackendError, match=r"--precision fp16: blob 'norm' has cosine .* use --precision fp32"):
        check_precision(fp16, x, fp16.run(x))
    small = x / 4000  # the same net on small activations passes in fp16
    assert min(check_precision(fp16, small, fp16.run(small)).values()) >= 0.999
