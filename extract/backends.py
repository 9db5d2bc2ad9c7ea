"""Inference backends behind one call: ``backend.run(batch) -> {blob: array}``.

- onnxruntime: the package's ONNX graph cut at the requested blobs (``pkg.onnx_path_for``); CPU,
  or the CUDA execution provider when onnxruntime-gpu is installed.
- torch: ``convert.load_torch``; on CUDA with channels_last and fp16/bf16 autocast, on CPU fp32.

``--device auto`` picks the fastest present: torch on CUDA (fp16 autocast) when a GPU is visible,
else onnxruntime on CPU (measured faster than torch CPU: docs/benchmarks.md). ``--device cuda:N``
runs on GPU N (``cuda`` alone: torch's current device, normally 0); the index never enters the
cache key, which (like the CPU/GPU choice) names what is computed, not where.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

BACKENDS = ("auto", "onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class BackendError(ValueError):
    """The requested backend/device/precision cannot run here; one-line message."""


class Backend(Protocol):
    """What the pipeline needs from an inference engine."""

    name: str  # e.g. "onnxruntime-cpu", "torch-cuda", "torch-cuda:1"
    device: str  # "cpu", "cuda" or "cuda:N" (see device_kind)
    precision: str  # "fp32", "fp16", "bf16": part of the cache key

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """float32 (N, C, H, W) -> {blob: float32 array with N rows}."""
        ...


def parse_device(text: str) -> tuple[str, int | None]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> (kind, index or None): the one parser every
    ``--device`` goes through, so a typo is refused before any library loads."""
    kind, sep, index = str(text).strip().partition(":")
    if not sep and kind in DEVICES:
        return kind, None
    if kind == "cuda" and index.isdigit() and index.isascii():
        return "cuda", int(index)
    raise BackendError(f"--device {text}: expected auto, cpu, cuda or cuda:N (N a GPU index: 0, 1, ...)")


def device_kind(device: str) -> str:
    """``cuda:1`` -> ``cuda``: what every "is this a GPU run" check compares."""
    return parse_device(device)[0]


def _on_device(device: str) -> contextlib.AbstractContextManager:
    """torch's current CUDA device set to ``device``'s for the block (events, streams, pinned
    buffers and bf16 support then concern that GPU); a no-op for CPU or a bare ``cuda``."""
    kind, index = parse_device(device)
    if kind != "cuda" or index is None:
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(index)


def _no_nvidia_driver() -> bool:
    """True when this machine certainly has no NVIDIA GPU: no driver, no device node. Importing
    torch only to ask costs 3 s of a CPU run's start-up."""
    import glob

    return not (os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/nvidia[0-9]*")
                or os.environ.get("CUDA_VISIBLE_DEVICES") not in (None, "", "-1") and os.path.exists("/dev/dxg"))


def _cuda_available() -> bool:
    import sys

    if "torch" not in sys.modules and sys.platform.startswith("linux") and _no_nvidia_driver():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ort_cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def check_torch_cuda(device: str) -> None:
    """One-line error unless torch can run on ``device`` (``cuda`` or ``cuda:N``)."""
    if not _cuda_available():
        raise BackendError(f"--device {device}: torch sees no CUDA device")
    index = parse_device(device)[1]
    if index is None:
        return
    import torch

    n = int(torch.cuda.device_count())
    if index >= n:
        seen = "1 CUDA device (0)" if n == 1 else f"{n} CUDA devices (0-{n - 1})"
        raise BackendError(f"--device {device}: torch sees {seen}")


def auto_cuda_precision(device: str = "cuda") -> str:
    """bf16 where the GPU (``device``'s) computes it, else fp32; never fp16 by default: Caffe nets
    with LRN or Normalize square activations that overflow fp16 (|x| > 256) into zeros and NaN."""
    import torch

    with _on_device(device):
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
    """Turn ``auto`` choices into (backend, device, precision) that can run on this machine; the
    device keeps its index (``cuda:1``), compare ``device_kind(device)`` to ask for CUDA."""
    if backend not in BACKENDS or precision not in PRECISIONS:
        raise BackendError(f"unknown backend/precision {backend!r}/{precision!r}")
    kind, index = parse_device(device)
    device = kind if index is None else f"cuda:{index}"  # " cuda:01" -> "cuda:1", the name runs report
    if kind == "auto":
        if backend == "onnxruntime":
            kind = "cuda" if _ort_cuda_available() else "cpu"
        else:
            kind = "cuda" if _cuda_available() else "cpu"
        device = kind
    if backend == "auto":
        backend = "torch" if kind == "cuda" else "onnxruntime"
    if kind == "cuda":
        if backend == "torch":
            check_torch_cuda(device)
        if backend == "onnxruntime" and not _ort_cuda_available():
            raise BackendError(f"--device {device} --backend onnxruntime: CUDAExecutionProvider is not available{_ort_install_hint()}")
    if precision == "auto":
        precision = auto_cuda_precision(device) if (kind == "cuda" and backend == "torch") else "fp32"
    # bf16 autocast also runs on CPU (AMX/AVX-512 CPUs gain from it); fp16 only on CUDA
    if precision != "fp32" and not (backend == "torch" and (kind == "cuda" or precision == "bf16")):
        raise BackendError(f"--precision {precision} needs --backend torch on CUDA (or bf16 on CPU); use fp32 here")
    return backend, device, precision


def _ort_providers(device: str) -> list[Any]:
    """onnxruntime's provider list: CUDA on ``device``'s GPU (``device_id``) with CPU fallback."""
    kind, index = parse_device(device)
    if kind != "cuda":
        return ["CPUExecutionProvider"]
    cuda: Any = "CUDAExecutionProvider" if index is None else ("CUDAExecutionProvider", {"device_id": index})
    return [cuda, "CPUExecutionProvider"]


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
        self.session = self._session(ort, str(pkg.onnx_path_for(self.blobs)), opts)
        # onnxruntime falls back to CPU without a word when the CUDA libraries do not load: the
        # provider it actually uses is what the run (and the cache manifest) reports
        self.provider = self.session.get_providers()[0]
        on_cuda = device_kind(device) == "cuda"
        if on_cuda and self.provider != "CUDAExecutionProvider":
            raise BackendError(f"--device {device}: onnxruntime runs on {self.provider}, not CUDA (its CUDA provider did not "
                               f"load{_ort_install_hint()}); use --device cpu, or --backend torch")
        self.name = f"onnxruntime-{device}" if on_cuda else "onnxruntime-cpu"
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        if set(self.blobs) <= set(names):
            self.output_names = list(self.blobs)
        elif len(names) == len(self.blobs):  # graph outputs renamed: trust the requested order
            self.output_names = names
        else:
            raise BackendError(f"ONNX graph outputs {names} do not match requested blobs {self.blobs}")

    def _session(self, ort: Any, path: str, opts: Any) -> Any:
        """The session on ``self.device``; a GPU index onnxruntime cannot open is a one-line error
        (it has no device count to check against beforehand)."""
        try:
            return ort.InferenceSession(path, opts, providers=_ort_providers(self.device))
        except Exception as err:
            said = str(err).lower()
            if parse_device(self.device)[1] is None or not any(w in said for w in ("ordinal", "device", "cuda")):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BackendError(f"--device {self.device}: onnxruntime could not open that GPU: {first}") from err

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return {b: np.asarray(o, dtype=np.float32) for b, o in zip(self.blobs, outs)}


class DeviceNormalize:
    """The float part of preprocessing (mean, mean image, scale, NHWC -> NCHW, transpose) as torch
    ops on the device (``cpu``, ``cuda`` or ``cuda:N``), so a GPU run ships uint8 images: 4x fewer bytes over PCIe than float32,
    and no float work left to the decode threads. Elementwise the same float32 operations as
    ``Preprocess.normalize``, so the results are bit-identical to the host path."""

    def __init__(self, pp: Any, device: str) -> None:
        import torch

        self.torch = torch
        self.mean = None if pp.mean is None else torch.tensor(pp.mean, dtype=torch.float32, device=device)
        self.mean_image = None
        if pp.mean_image is not None and pp.input_shape() is not None:
            from extract.preprocess import _fit_mean

            c, h, w = pp.input_shape()
            hw = (w, h) if pp.transpose else (h, w)
            self.mean_image = torch.from_numpy(np.ascontiguousarray(_fit_mean(pp.mean_image, hw))).to(device)
        self.scale = float(pp.scale)
        self.transpose = bool(pp.transpose)

    def __call__(self, x: Any) -> Any:
        """uint8 (N, H, W, C) tensor on the device -> float32 (N, C, H, W)."""
        x = x.float()
        if self.mean is not None:
            x = x - self.mean
        x = x.permute(0, 3, 1, 2)
        if self.mean_image is not None:
            x = x - self.mean_image
        if self.scale != 1.0:
            x = x * self.torch.tensor(self.scale, dtype=self.torch.float32)
        if self.transpose:
            x = x.transpose(2, 3)
        return x


class TorchBackend:
    """``convert.load_torch`` module; CUDA runs channels_last under autocast.

    Given the preprocessing (``preprocess=``), :meth:`run` also takes uint8 (N, H, W, C) batches
    and normalises them on the device; on CUDA the host side is a reused pinned buffer per
    in-flight batch, copied asynchronously, and :meth:`submit` returns before the GPU is done so
    the next batch is decoded and copied while this one computes."""

    IN_FLIGHT = 2

    def __init__(self, pkg: Any, blobs: Sequence[str], device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 preprocess: Any = None) -> None:
        import torch

        from convert import load_torch

        self.torch = torch
        self.blobs = list(blobs)
        self.device = device
        self.on_cuda = device_kind(device) == "cuda"
        self.precision = precision
        self.name = f"torch-{device}"
        if threads and not self.on_cuda:
            torch.set_num_threads(threads)
        net = load_torch(pkg).eval()
        if self.on_cuda:
            with _on_device(device):
                net = net.to(device, memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.net = net
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.normalize = DeviceNormalize(preprocess, device) if preprocess is not None else None
        self._pinned: list[Any] = []
        self._turn = 0

    @property
    def takes_uint8(self) -> bool:
        return self.normalize is not None

    def _to_device(self, batch: np.ndarray) -> Any:
        """Host array -> device tensor; on CUDA through a reused pinned buffer, asynchronously."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch))
        if not self.on_cuda:
            return x
        i = self._turn % self.IN_FLIGHT
        self._turn += 1
        while len(self._pinned) <= i:
            self._pinned.append(None)
        buf = self._pinned[i]
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self._pinned[i] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x)
        return buf.to(self.device, non_blocking=True)

    def submit(self, batch: np.ndarray, reduced: bool = True) -> Callable[[], dict[str, np.ndarray]]:
        """Start ``batch`` (float32 NCHW, or uint8 NHWC when the backend normalises); returns the
        call that waits for its blobs. On CUDA the GPU is still busy when this returns. Runs with
        the backend's GPU current, so the copies and the event are on its stream, not GPU 0's."""
        torch = self.torch
        dtype = self.autocast_dtype if reduced else None
        with torch.inference_mode(), _on_device(self.device):
            if batch.dtype == np.uint8:
                if self.normalize is None:
                    raise BackendError("uint8 batches need the backend built with the preprocessing")
                x = self.normalize(self._to_device(batch))
            else:
                x = self._to_device(np.asarray(batch, dtype=np.float32))
            if self.on_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_kind(self.device), dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.net(x, blobs=self.blobs)
            outs = {b: out[b].float() for b in self.blobs}
            if self.on_cuda:
                outs = {b: t.to("cpu", non_blocking=True) for b, t in outs.items()}
                done = torch.cuda.Event()
                done.record()
            else:
                done = None

        def result() -> dict[str, np.ndarray]:
            if done is not None:
                done.synchronize()
            return {b: t.numpy() for b, t in outs.items()}

        return result

    def run(self, batch: np.ndarray, reduced: bool = True) -> dict[str, np.ndarray]:
        """The blobs of ``batch``, under autocast at the backend's precision (``reduced=False``:
        in fp32, the reference the first batch of a reduced-precision run is checked against)."""
        return self.submit(batch, reduced)()

    def run_fp32(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(batch, reduced=False)


class LazyBackend:
    """A backend built on its first batch: a re-run whose images are all cached never loads the
    network (for VGG-16, half a gigabyte read and an onnxruntime session optimised for nothing)."""

    def __init__(self, pkg: Any, blobs: Sequence[str], backend: str = "auto", device: str = "auto",
                 precision: str = "auto", threads: int | None = None, preprocess: Any = None) -> None:
        self._args = (pkg, list(blobs), threads, preprocess)
        self.kind, self.device, self.precision = resolve(backend, device, precision)
        self._net: Backend | None = None

    @property
    def takes_uint8(self) -> bool:
        """torch given the preprocessing normalises uint8 batches itself (see :class:`TorchBackend`)."""
        return self.kind == "torch" and self._args[3] is not None

    @property
    def net(self) -> Backend:
        if self._net is None:
            pkg, blobs, threads, pp = self._args
            self._net = make_backend(pkg, blobs, self.kind, self.device, self.precision, threads, preprocess=pp)
        return self._net

    @property
    def name(self) -> str:
        """The backend that ran (onnxruntime's provider decides it), or the one planned if none did."""
        return self._net.name if self._net is not None else f"{self.kind}-{self.device}"

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.net.run(batch)

    def submit(self, batch: np.ndarray) -> Callable[[], dict[str, np.ndarray]]:
        return submit(self.net, batch)

    def run_fp32(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.net.run_fp32(batch)  # type: ignore[attr-defined]


def make_backend(pkg: Any, blobs: Sequence[str], backend: str = "auto", device: str = "auto", precision: str = "auto",
                 threads: int | None = None, preprocess: Any = None) -> Backend:
    """Build the backend ``resolve`` picks for this machine (torch gets ``preprocess`` to
    normalise uint8 batches on its device)."""
    backend, device, precision = resolve(backend, device, precision)
    if backend == "onnxruntime":
        return OrtBackend(pkg, blobs, device=device, threads=threads)
    return TorchBackend(pkg, blobs, device=device, precision=precision, threads=threads, preprocess=preprocess)


def submit(backend: Any, batch: np.ndarray) -> Callable[[], dict[str, np.ndarray]]:
    """``backend.submit`` where it runs asynchronously (torch on CUDA), else the batch computed now."""
    if hasattr(backend, "submit"):
        return backend.submit(batch)
    out = backend.run(batch)
    return lambda: out


def default_batch_size(device: str) -> int:
    """Big enough to amortise per-call overhead; on CPU larger batches barely help."""
    return 64 if device_kind(device) == "cuda" else 8


def default_workers(device: str) -> int:
    """Decode threads (OpenCV decodes and resizes without the GIL). On CPU hosts all cores would
    fight the inference threads for little gain; feeding a GPU thousands of images a second
    takes every core there is, up to 16."""
    n = os.cpu_count() or 1
    return max(2, min(16, n)) if device_kind(device) == "cuda" else max(1, min(4, n))
