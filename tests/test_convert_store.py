"""weights.safetensors written while torch imports (StreamingSafetensors): the header goes in
last with the final shapes; when the final tensors are not what was streamed, the file is
rewritten the plain way. Either way safetensors reads it and the returned spans and sha256 hold."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest


@pytest.mark.parametrize("same_layout", [True, False])
def test_streamed_file_reads_back(tmp_path, same_layout):
    from safetensors.numpy import load_file

    from convert.store import StreamingSafetensors

    rng = np.random.default_rng(0)
    streamed = {"fc.0": rng.standard_normal((1, 1, 4, 6)).astype(np.float32), "fc.1": rng.standard_normal(4).astype(np.float32)}
    final = {"fc.0": streamed["fc.0"].reshape(4, 6), "fc.1": streamed["fc.1"]}  # legacy 4-D shape dropped
    if not same_layout:  # a layer that used no blob of the caffemodel
        final = {"fc.0": final["fc.0"]}
    path = tmp_path / "weights.safetensors"
    spans, sha = StreamingSafetensors(path, streamed, {"format": "test"}).finish(final)
    back = load_file(str(path))
    assert list(back) == list(final)
    raw = path.read_bytes()
    for k, a in final.items():
        assert back[k].shape == a.shape and np.array_equal(back[k], a)
        off, n = spans[k]
        assert np.array_equal(np.frombuffer(raw[off:off + n], "<f4").reshape(a.shape), a)
    assert sha.result() == hashlib.sha256(raw).hexdigest()
