"""``extract --engine ray`` on a local Ray cluster (2 CPUs) started by the test, on real faces.

The Ray engine must be the local engine run elsewhere: the same rows (same backend, so equal
to 1e-5), the same cache key, shard format and commit rule (a cache one engine wrote, the other
resumes), failures counted the same way; and it must survive its faults: a SIGKILLed driver
re-run with the same command computes only what no shard committed, and an actor process killed
mid-run has its batches retried with nothing stored twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray", reason="the Ray engine's tests need ray[data] (pip install -e .[ray]; the README's test command installs it)")

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO.parent / "shared" / "testbed"
DET3 = TESTBED / "caffe" / "mtcnn"
NSFW = TESTBED / "caffe" / "open_nsfw"
GENDER = TESTBED / "faces" / "imdbwiki" / "gender-data"

pytestmark = pytest.mark.skipif(not DET3.is_dir() or not GENDER.is_dir() or not NSFW.is_dir(),
                                reason=f"test bed absent: {TESTBED}")


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU cluster; its address lets CLI subprocesses join it as drivers."""
    if not ray.is_initialized():
        # address="local": a new cluster even when another runs on this machine (ray.init would join it)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _faces(n: int) -> list[Path]:
    files = sorted((GENDER / "train" / "female").iterdir()) + sorted((GENDER / "train" / "male").iterdir())
    return files[:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """det3 (48x48, fast) and open_nsfw (ResNet-50, slow enough to kill mid-run) converted; a
    folder of real faces with a duplicate, a corrupt JPEG and an empty file among them."""
    from convert import convert_model
    from convert.preprocess import build_preprocess

    tmp = tmp_path_factory.mktemp("ray")
    pre, _ = build_preprocess([1, 3, 48, 48], mean="127.5", scale=0.0078125, channel_order="rgb")
    convert_model(DET3 / "det3.prototxt", DET3 / "det3.caffemodel", tmp / "det3", "det3", preprocess=pre, log=lambda _m: None)
    spec, _ = build_preprocess([1, 3, 224, 224], mean="104,117,123", resize="256", crop=224, channel_order="bgr")
    convert_model(NSFW / "deploy.prototxt", NSFW / "resnet_50_1by2_nsfw.caffemodel", out=tmp / "nsfw", name="open_nsfw",
                  preprocess=spec, verify=False, log=lambda *a, **k: None)
    faces = tmp / "faces"
    for cls in ("a", "b"):
        (faces / cls).mkdir(parents=True)
    files = _faces(60)
    for i, f in enumerate(files):
        os.symlink(f, faces / ("a" if i % 2 else "b") / f.name)
    os.symlink(files[0], faces / "a" / "copy_of_first.jpg")  # same bytes under a second path
    (faces / "b" / "broken.jpg").write_bytes(files[1].read_bytes()[:300])  # a truncated JPEG
    (faces / "b" / "empty.jpg").write_bytes(b"")
    many = tmp / "many"
    many.mkdir()
    for f in _faces(240):
        os.symlink(f, many / f.name)
    return {"tmp": tmp, "det3": tmp / "det3", "nsfw": tmp / "nsfw", "faces": faces, "many": many}


def _extract(world, cache: Path, images: Path, engine: str, model: str = "det3", blobs=("conv5", "prob1"), **kw):
    from extract.pipeline import extract
    from extract.sources import load_records

    records = load_records(images=str(images))
    return extract(world[model], list(blobs), records, cache=cache, progress=False, engine=engine, **kw)


def _key_dir(cache: Path) -> Path:
    (key,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    return key


def _stored_shas(key: Path) -> list[str]:
    """Every stored row's content hash, over all committed shards (duplicates kept)."""
    return [s for m in sorted(key.glob("meta_*.parquet")) for s in pq.read_table(m, columns=["sha256"]).column(0).to_pylist()]


def test_ray_rows_equal_local_rows(world, cluster):
    from extract import load_embeddings

    s_local, f_local = _extract(world, world["tmp"] / "c_local", world["faces"], "local")
    s_ray, f_ray = _extract(world, world["tmp"] / "c_ray", world["faces"], "ray")
    assert "on ray" in s_ray.backend and s_ray.workers == 2
    assert (s_ray.images, s_ray.unique, s_ray.computed, s_ray.failed) == (s_local.images, s_local.unique, s_local.computed, s_local.failed)
    assert s_ray.computed == 60 and s_ray.failed == 2  # 63 files: one duplicate, two bad
    assert dict(zip(f_ray.path, f_ray.reason)) == dict(zip(f_local.path, f_local.reason))
    assert _key_dir(world["tmp"] / "c_ray").name == _key_dir(world["tmp"] / "c_local").name  # the same cache key
    for blob in ("conv5", "prob1"):
        X1, m1 = load_embeddings(world["tmp"] / "c_local", blob)
        X2, m2 = load_embeddings(world["tmp"] / "c_ray", blob)
        pd.testing.assert_frame_equal(m1, m2)
        assert X1.shape == X2.shape == (61, X1.shape[1])
        assert float(np.abs(np.asarray(X1) - np.asarray(X2)).max()) <= 1e-5
    ray_manifest = json.loads((_key_dir(world["tmp"] / "c_ray") / "manifest.json").read_text())
    assert ray_manifest["runs"][-1]["backend"].startswith("onnxruntime-cpu on ray")


def test_one_cache_two_engines(world, cluster):
    """Half by the local engine, all by Ray: Ray computes only the other half; then the local
    engine computes nothing. The other way round too. Rows equal a single-engine cache."""
    from extract import load_embeddings

    files = sorted(world["many"].iterdir())[:80]
    half, full = world["tmp"] / "half", world["tmp"] / "full"
    for d, fs in ((half, files[:40]), (full, files)):
        d.mkdir()
        for f in fs:
            os.symlink(os.readlink(f), d / f.name)
    ref, _ = _extract(world, world["tmp"] / "m_ref", full, "local")
    X_ref, m_ref = load_embeddings(world["tmp"] / "m_ref", "conv5")
    for first, second in (("local", "ray"), ("ray", "local")):
        cache = world["tmp"] / f"m_{first}_{second}"
        a, _ = _extract(world, cache, half, first)
        b, _ = _extract(world, cache, full, second)
        c, _ = _extract(world, cache, full, first)
        assert (a.computed, b.cached, b.computed, c.computed) == (40, 40, 40, 0)
        X, m = load_embeddings(cache, "conv5", dataset="full")
        assert sorted(_stored_shas(_key_dir(cache))) == sorted(set(m_ref["sha256"]))  # each image stored once
        pd.testing.assert_frame_equal(m, m_ref)
        np.testing.assert_allclose(np.asarray(X), np.asarray(X_ref), atol=1e-5, rtol=0)


def _cli_cmd(world, cache: Path, address: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "extract", "--model", str(world["nsfw"]), "--layer", "pool",
            "--images", str(world["many"]), "--cache", str(cache), "--engine", "ray", "--ray-address", address,
            "--batch-size", "4", "--shard-size", "8", "--no-progress"]


def test_driver_sigkill_then_rerun_computes_each_image_once(world, cluster):
    cache = world["tmp"] / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli_cmd(world, cache, cluster), cwd=world["tmp"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if cache.is_dir() and any(cache.glob("*/meta_*.parquet")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    key = _key_dir(cache)
    committed = _stored_shas(key)
    assert 0 < len(committed) < 240 and len(set(committed)) == len(committed)
    assert not (key / "datasets").exists()  # the killed run's dataset was never written

    rerun = subprocess.run(_cli_cmd(world, cache, cluster), cwd=world["tmp"], env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(committed)} already cached, {240 - len(committed)} computed, 0 failed" in rerun.stdout
    stored = _stored_shas(key)
    assert len(stored) == len(set(stored)) == 240  # every image exactly once
    assert not [p.name for p in key.iterdir() if p.name.endswith(".tmp")]  # debris of the kill removed


def _actor_pids() -> list[int]:
    """Processes of this cluster's Ray Data actors running the Embedder (their title says so)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "MapWorker" in cmd and "Embedder" in cmd:
                pids.append(int(d.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds actor processes through /proc")
def test_dead_actor_is_replaced_and_its_batches_retried(world, cluster):
    from extract import load_embeddings

    cache = world["tmp"] / "actor_killed"
    killed: list[int] = []

    def kill_one_when_running() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            pids = _actor_pids()
            if pids and cache.is_dir() and any(cache.glob("*/meta_*.parquet")):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=kill_one_when_running, daemon=True)
    t.start()
    s, fails = _extract(world, cache, world["many"], "ray", model="nsfw", blobs=("pool",), batch_size=4, shard_size=8)
    t.join(5)
    assert killed, "no actor was killed: the run finished first"
    assert (s.computed, s.failed) == (240, 0) and fails.empty
    stored = _stored_shas(_key_dir(cache))
    assert len(stored) == len(set(stored)) == 240  # the dead actor's batches came back once
    assert killed[0] not in _actor_pids()

    ref, _ = _extract(world, world["tmp"] / "actor_ref", world["many"], "local", model="nsfw", blobs=("pool",))
    X, m = load_embeddings(cache, "pool")
    X_ref, m_ref = load_embeddings(world["tmp"] / "actor_ref", "pool")
    pd.testing.assert_frame_equal(m, m_ref)
    assert float(np.abs(np.asarray(X) - np.asarray(X_ref)).max()) <= 1e-5


def test_cli_errors_are_one_line(world, cluster, tmp_path, capsys, monkeypatch):
    import cli

    common = ["extract", "--model", str(world["det3"]), "--layer", "conv5", "--images", str(world["faces"]),
              "--cache", str(tmp_path / "c"), "--engine", "ray", "--no-progress"]
    assert cli.main([*common, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no GPUs" in err
    assert cli.main([*common, "--device", "cuda:1"]) == 2
    assert "--gpus-per-worker" in capsys.readouterr().err
    assert cli.main([*common, "--cpus-per-worker", "64"]) == 2  # more than the cluster has: would wait forever
    assert "has not that many CPUs" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing written before the plan stands


def test_unreachable_address_and_missing_ray_are_one_line(tmp_path, world, capsys, monkeypatch):
    import socket

    import cli

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["extract", "--model", str(world["det3"]), "--layer", "conv5", "--images", str(world["faces"]),
              "--cache", str(tmp_path / "c"), "--engine", "ray", "--no-progress"]
    t = time.time()  # in a fresh process (this one is connected already): ray.init alone would retry for minutes
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), *common, "--ray-address", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and time.time() - t < 60
    assert len(r.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in r.stderr and "ray start" in r.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert cli.main(common) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "ray" in err


def test_engine_flags_reach_the_engine():
    """--workers is the number of actors with ray; parsing keeps the flags typed."""
    import argparse

    from extract.commands import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    a = ap.parse_args(["extract", "--model", "m", "--layer", "fc7", "--images", "d", "--engine", "ray", "--ray-address",
                       "auto", "--gpus-per-worker", "0.5", "--cpus-per-worker", "4", "--workers", "8"])
    assert (a.engine, a.ray_address, a.gpus_per_worker, a.cpus_per_worker, a.workers) == ("ray", "auto", 0.5, 4.0, 8)


def test_failed_shard_debris_is_not_read(world, cluster):
    """An uncommitted shard (embeddings, no meta) left by a kill is removed, never read."""
    cache = world["tmp"] / "debris"
    _extract(world, cache, world["faces"], "ray")
    key = _key_dir(cache)
    fake = key / "emb_conv5_999999.npy"
    np.save(fake, np.zeros((3, 256), np.float32))
    again, _ = _extract(world, cache, world["faces"], "ray")
    assert again.computed == 0 and not fake.exists()
    shutil.rmtree(cache)
