"""Inference backends behind one call: ``backend.run(batch) -> {blob: array}``.

- onnxruntime: the package's ONNX graph cut at the requested blobs (``pkg.onnx_path_for``); CPU,
  or the CUDA execution provider when onnxruntime-gpu is installed.
- torch: ``convert.load_torch``; on CUDA with channels_last and fp16/bf16 autocast, on CPU fp32.

``--device auto`` picks the fastest present: torch on CUDA (fp16 autocast) when a GPU is visible,
else onnxruntime on CPU (measured faster than torch CPU: docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

BACKENDS = ("auto", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class BackendError(ValueError):
    """The requested backend/device/precision cannot run here; one-line message."""


class Backend(Protocol):
    """What the pipeline needs from an inference engine."""

    name: str  # e.g. "onnxruntime-cpu", "torch-cuda"
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16", "bf16": part of the cache key

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, C, H, W) -> {blob: float32 array with N rows}."""
        ...


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _auto_cuda_precision() -> str:
    """bf16 where the GPU computes it, else fp32; never fp16 by default: Caffe nets with LRN or
    Normalize square activations that overflow fp16 (|x| > 256) into zeros and NaN."""
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def _ort_install_hint() -> str:
    """Why onnxruntime may have no CUDA provider: both wheels installed is the usual cause."""
    from importlib import metadata

    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            have.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(have) == 2:
        return ("; onnxruntime and onnxruntime-gpu are both installed and the CPU one wins: "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    if "onnxruntime-gpu" in have:
        return "; check that the CUDA and cuDNN versions onnxruntime-gpu was built for are installed"
    return "; install onnxruntime-gpu instead of onnxruntime"


def resolve(backend: str = "auto", device: str = "auto", precision: str = "auto") -> tuple[str, str, str]:
    """Turn ``auto`` choices into (backend, device, precision) that can run on this machine."""
    if backend not in BACKENDS or device not in DEVICES or precision not in PRECISIONS:
        raise BackendError(f"unknown backend/device/precision {backend!r}/{device!r}/{precision!r}")
    if device == "auto":
        if backend == "onnxruntime":
            device = "cuda" if _ort_cuda_available() else "cpu"
        else:
            device = "cuda" if _cuda_available() else "cpu"
    if backend == "auto":
        backend = "torch" if device == "cuda" else "onnxruntime"
    if device == "cuda":
        if backend == "torch" and not _cuda_available():
            raise BackendError("--device cuda: torch sees no CUDA device")
        if backend == "onnxruntime" and not _ort_cuda_available():
            raise BackendError(f"--device cuda --backend onnxruntime: CUDAExecutionProvider is not available{_ort_install_hint()}")
    if precision == "auto":
        precision = _auto_cuda_precision() if (device == "cuda" and backend == "torch") else "fp32"
    # bf16 autocast also runs on CPU (AMX/AVX-512 CPUs gain from it); fp16 only on CUDA
    if precision != "fp32" and not (backend == "torch" and (device == "cuda" or precision == "bf16")):
        raise BackendError(f"--precision {precision} needs --backend torch on CUDA (or bf16 on CPU); use fp32 here")
    return backend, device, precision


class OrtBackend:
    """onnxruntime session over the package's ONNX graph with exactly the requested outputs."""

    def __init__(self, pkg: Any, blobs: Sequence[str], device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        self.blobs = list(blobs)
        self.device = device
        self.precision = "fp32"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # Busy-waiting intra-op threads would steal the cores the decode workers need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(pkg.onnx_path_for(self.blobs)), opts, providers=providers)
        # onnxruntime falls back to CPU without a word when the CUDA libraries do not load: the
        # provider it actually uses is what the run (and the cache manifest) reports
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            raise BackendError(f"--device cuda: onnxruntime runs on {self.provider}, not CUDA (its CUDA provider did not "
                               f"load{_ort_install_hint()}); use --device cpu, or --backend torch")
        self.name = "onnxruntime-cuda" if self.provider == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if set(self.blobs) <= set(names):
            self.output_names = list(self.blobs)
        elif len(names) == len(self.blobs):  # graph outputs renamed: trust the requested order
            self.output_names = names
        else:
            raise BackendError(f"ONNX graph outputs {names} do not match requested blobs {self.blobs}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return {b: np.asarray(o, dtype=np.float32) for b, o in zip(self.blobs, outs)}


class TorchBackend:
    """``convert.load_torch`` module; CUDA runs channels_last under autocast."""

    def __init__(self, pkg: Any, blobs: Sequence[str], device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        import torch

        from convert import load_torch

        self.torch = torch
        self.blobs = list(blobs)
        self.device = device
        self.precision = precision
        self.name = f"torch-{device}"
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        net = load_torch(pkg).eval()
        if device == "cuda":
            net = net.to("cuda", memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.net = net
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def run(self, batch: np.ndarray, reduced: bool = True) -> dict[str, np.ndarray]:
        """The blobs of ``batch``, under autocast at the backend's precision (``reduced=False``:
        in fp32, the reference the first batch of a reduced-precision run is checked against)."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        dtype = self.autocast_dtype if reduced else None
        with torch.inference_mode():
            if self.device == "cuda":
                x = x.pin_memory().to("cuda", non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.net(x, blobs=self.blobs)
            return {b: out[b].float().cpu().numpy() for b in self.blobs}

    def run_fp32(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(batch, reduced=False)


class LazyBackend:
    """A backend built on its first batch: a re-run whose images are all cached never loads the
    network (for VGG-16, half a gigabyte read and an onnxruntime session optimised for nothing)."""

    def __init__(self, pkg: Any, blobs: Sequence[str], backend: str = "auto", device: str = "auto",
                 precision: str = "auto", threads: int | None = None) -> None:
        self._args = (pkg, list(blobs), threads)
        self.kind, self.device, self.precision = resolve(backend, device, precision)
        self._net: Backend | None = None

    @property
    def net(self) -> Backend:
        if self._net is None:
            pkg, blobs, threads = self._args
            self._net = make_backend(pkg, blobs, self.kind, self.device, self.precision, threads)
        return self._net

    @property
    def name(self) -> str:
        """The backend that ran (onnxruntime's provider decides it), or the one planned if none did."""
        return self._net.name if self._net is not None else f"{self.kind}-{self.device}"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.net.run(batch)

    def run_fp32(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.net.run_fp32(batch)  # type: ignore[attr-defined]


def make_backend(pkg: Any, blobs: Sequence[str], backend: str = "auto", device: str = "auto", precision: str = "auto", threads: int | None = None) -> Backend:
    """Build the backend ``resolve`` picks for this machine."""
    backend, device, precision = resolve(backend, device, precision)
    if backend == "onnxruntime":
        return OrtBackend(pkg, blobs, device=device, threads=threads)
    return TorchBackend(pkg, blobs, device=device, precision=precision, threads=threads)


def default_batch_size(device: str) -> int:
    """Big enough to amortise per-call overhead; on CPU larger batches barely help."""
    return 64 if device == "cuda" else 8


def default_workers(device: str) -> int:
    """Decode threads: all cores on CPU hosts would fight the inference threads for little gain."""
    n = os.cpu_count() or 1
    return max(2, min(8, n)) if device == "cuda" else max(1, min(4, n))
