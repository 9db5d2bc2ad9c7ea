"""Check a conversion before it is written: the ONNX checker on the emitted model, then the
ONNX model (onnxruntime) and the torch module on the same inputs, every blob compared.

Inputs are drawn like preprocessed images (uniform 0..255 pixels through the package's mean
and scale) at a batch of two (two clips where the graph regroups its batch), so a batch baked
into the graph or images mixed across the batch show up as disagreement.

Two float32 runs of the same formula can disagree by more than rounding where the net
amplifies it (a Sigmoid saturating on 0..255 inputs turns a last-bit difference in a large
pre-activation into a visible one). Before refusing, such a blob is adjudicated: the torch
module runs again in float64 and each float32 run is judged against it. The blob is accepted
when onnxruntime is no further from the float64 result than torch's own float32 run is (within
``FACTOR``), or within tolerance of it; failing that, when its own layer, run in float64 on
onnxruntime's inputs, agrees with onnxruntime just as well (the difference was inherited from
upstream blobs that each passed: onnxruntime's Sigmoid is accurate to 1e-7 absolute, not
relative, so a saturated gate times a 1e4 activation differs by 1e-3). Otherwise the
conversion is refused, naming the blob, its layer type and both errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import GraftError
from .ir import Graph
from .layers._common import torch  # imported when first used: onnxruntime runs first, meanwhile torch imports

if TYPE_CHECKING:
    from collections.abc import Callable

ATOL = 1e-5
RTOL = 1e-3  # relative to the blob's largest magnitude: float32 sums in another order differ ~1e-6
#: onnxruntime may be this many times further from float64 than torch float32 and still pass
FACTOR = 4.0


def compare(ref: np.ndarray, other: np.ndarray) -> dict:
    """Largest absolute difference, and the reference's largest finite magnitude."""
    ref, other = np.asarray(ref), np.asarray(other)
    if ref.shape != other.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "max_ref": 0.0, "shape": [list(ref.shape), list(other.shape)]}
    if not ref.size:
        return {"max_abs": 0.0, "max_rel": 0.0, "max_ref": 0.0}
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(np.subtract(ref, other))  # in the wider of the two dtypes: exact enough for a max
        max_abs = float(diff.max())
    if np.isfinite(max_abs):  # no inf or NaN on either side: the common case, one pass (VGG-Face: 1.7 s -> 0.1 s)
        scale = float(np.abs(ref).max())
    else:
        max_abs, scale = _compare_nonfinite(ref.astype(np.float64), other.astype(np.float64))
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else 0.0, "max_ref": scale}


def _compare_nonfinite(ref: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Equal infinities and NaN against NaN agree; any other non-finite difference is infinite."""
    with np.errstate(invalid="ignore", over="ignore"):
        same = (ref == other) | (np.isnan(ref) & np.isnan(other))
        diff = np.where(same, 0.0, np.abs(ref - other))
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite = np.abs(ref[np.isfinite(ref)])
    return float(diff.max()), float(finite.max()) if finite.size else 0.0


def tolerance(stats: dict, atol: float = ATOL, rtol: float = RTOL) -> float:
    return atol + rtol * stats.get("max_ref", 0.0)


def passes(stats: dict, atol: float = ATOL, rtol: float = RTOL) -> bool:
    return stats["max_abs"] <= tolerance(stats, atol, rtol)


def check_onnx(path: Path) -> None:
    """``onnx.checker`` with full checking (types and shape inference) on the written model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:  # ValidationError, InferenceError, or a protobuf/IO error
        raise GraftError(f"the emitted ONNX model fails onnx.checker: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    notes = [n for n in getattr(err, "__notes__", []) if n.startswith("in layer")]
    return (f"{text} ({notes[0]})" if notes else text)[:500]


def run_onnx(graph: Graph, model: onnx.ModelProto, model_dir: Path, feeds: Mapping[str, np.ndarray],
             values: list[str]) -> dict[str, np.ndarray]:
    """Every value of ``values`` from onnxruntime; ``model``'s initializers reference ``model_dir``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for v in values:
        if v not in existing:
            probe.graph.output.add().name = v
    probe_path = model_dir / "_verify.onnx"
    onnx.save(probe, str(probe_path))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # its errors are reported here, as one line
        # One run only: re-packing every weight matrix for faster GEMMs costs more than it saves
        # (1.5 s of VGG-Face's 580 MB at session creation), and does not change the graph's values.
        opts.add_session_config_entry("session.disable_prepacking", "1")
        # Basic optimisations only: the layout transforms of ORT_ENABLE_ALL (NCHWc) re-lay every
        # weight at session creation and made VGG-Face's check 0.3 s slower (init 0.23 s + run
        # 0.82 s vs 0.08 s + 0.66 s at batch 2); the graph checked is the graph as emitted.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            sess = ort.InferenceSession(str(probe_path), opts, providers=["CPUExecutionProvider"])
            out = dict(zip(values, sess.run(values, dict(feeds))))
        except Exception as err:  # onnxruntime's own exception types derive from Exception only
            raise GraftError(f"onnxruntime cannot run the emitted model: {_first_line(err)}") from None
        del sess
    finally:
        probe_path.unlink(missing_ok=True)
    return out


def run_torch(graph: Graph, net: torch.nn.Module, feeds: Mapping[str, np.ndarray], values: list[str],
              dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    dtype = dtype or torch.float32
    xs = [torch.from_numpy(np.asarray(feeds[n])).to(dtype) for n in graph.inputs]
    try:
        with torch.inference_mode():
            out = net(*xs, blobs=values)
    except Exception as err:
        raise GraftError(f"torch ({str(dtype).replace('torch.', '')}) cannot run the converted net: {_first_line(err)}") from None
    return {v: t.detach().numpy() for v, t in out.items()}


def _accept(e_onnx: dict, e_torch: dict, atol: float, rtol: float) -> bool:
    """onnxruntime's error is float32 noise: within FACTOR of torch float32's, or within tolerance."""
    return e_onnx["max_abs"] <= max(FACTOR * e_torch["max_abs"], tolerance(e_onnx, atol, rtol)) + atol


def _local(graph: Graph, net: torch.nn.Module, value: str, feeds, onnx_out, torch_out) -> tuple[dict, dict]:
    """The producing layer alone in float64, on onnxruntime's and on torch's own inputs: each
    run's error in that layer, apart from what it inherited."""
    node = next(n for n in graph.nodes if value in n.outputs)
    k = node.outputs.index(value)

    def layer64(source: Mapping[str, np.ndarray]) -> np.ndarray:
        xs = [torch.from_numpy(np.asarray(feeds[i] if i in feeds else source[i])).to(torch.float64) for i in node.inputs]
        with torch.inference_mode():
            y = net.layers[node.name](*xs)
        return (y if isinstance(y, torch.Tensor) else y[k]).detach().numpy()

    return compare(layer64(onnx_out), onnx_out[value]), compare(layer64(torch_out), torch_out[value])


def _adjudicate(graph: Graph, net: torch.nn.Module, feeds, failed: list[str], onnx_out, torch_out,
                atol: float, rtol: float) -> dict[str, dict]:
    """float64 as the judge of each failed blob: the whole net, then (where onnxruntime is not
    within float32 noise of it) the blob's own layer on each run's inputs, so that noise
    amplified downstream of a blob that passed (a saturated Sigmoid's last bits times a large
    activation) is told apart from a layer that computes something else."""
    try:
        net.to(torch.float64)
        ref64 = run_torch(graph, net, feeds, failed, torch.float64)
    except GraftError as err:
        return {v: {"accepted": False, "float64": f"unavailable: {err}"} for v in failed}
    verdicts = {}
    for v in failed:
        e_onnx = compare(ref64[v], onnx_out[v])
        e_torch = compare(ref64[v], torch_out[v])
        verdict = {"onnx_vs_float64": e_onnx["max_abs"], "torch_vs_float64": e_torch["max_abs"],
                   "closer": "onnxruntime" if e_onnx["max_abs"] < e_torch["max_abs"] else "torch",
                   "accepted": _accept(e_onnx, e_torch, atol, rtol), "judged_by": "net in float64"}
        if not verdict["accepted"]:
            try:
                l_onnx, l_torch = _local(graph, net, v, feeds, onnx_out, torch_out)
            except Exception as err:  # a module that cannot run in float64 alone
                verdict["layer_float64"] = f"unavailable: {_first_line(err)}"
            else:
                verdict.update({"layer_onnx_vs_float64": l_onnx["max_abs"], "layer_torch_vs_float64": l_torch["max_abs"],
                                "accepted": _accept(l_onnx, l_torch, atol, rtol),
                                "judged_by": "its layer in float64 on each run's inputs"})
        verdicts[v] = verdict
    return verdicts


def _refusal(graph: Graph, report: dict, refused: list[str]) -> str:
    v = refused[0]  # the first in graph order: later ones usually follow from it
    layer = graph.values.get(v, {}).get("layer")
    ltype = next((n.type for n in graph.nodes if n.name == layer), "?")
    s, a = report["blobs"][v], report["adjudicated"][v]
    if "onnx_vs_float64" in a:
        errors = (f"onnxruntime is {a['onnx_vs_float64']:.3g} from the float64 result, torch float32 "
                  f"{a['torch_vs_float64']:.3g}")
        if "layer_onnx_vs_float64" in a:
            errors += (f" (in layer '{layer}' alone: onnxruntime {a['layer_onnx_vs_float64']:.3g}, "
                       f"torch {a['layer_torch_vs_float64']:.3g})")
    else:
        errors = f"float64 adjudication {a['float64']}"
    more = f"; {len(refused) - 1} more blob(s) refused" if len(refused) > 1 else ""
    return (f"verification failed: blob '{v}' (layer '{layer}', {ltype}): onnxruntime and torch differ by "
            f"{s['max_abs']:.3g} (tolerance {tolerance(s, report['atol'], report['rtol']):.3g}); {errors}{more}; "
            "package not written")


def verify_package(
    graph: Graph,
    model: onnx.ModelProto,
    model_dir: Path,
    make_net: Callable[[], torch.nn.Module],
    feeds: Mapping[str, np.ndarray],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict:
    """Every named value from onnxruntime vs torch, adjudicated in float64 where they differ.

    ``model`` is the package's graph, already written to ``model_dir/model.onnx`` (its
    initializers reference files there). Raises GraftError when a blob is refused.
    ``make_net()`` builds the torch module once onnxruntime has run (torch may still be
    importing until then); the module may be left in float64.
    """
    check_onnx(model_dir / "model.onnx")
    values = [v for v in graph.shapes if v not in graph.inputs]
    onnx_out = run_onnx(graph, model, model_dir, feeds, values)
    net = make_net()
    torch_out = run_torch(graph, net, feeds, values)
    blobs = {}
    for v in values:
        stats = compare(onnx_out[v], torch_out[v])
        stats["passed"] = passes(stats, atol, rtol)
        blobs[v] = stats
    failed = [v for v, s in blobs.items() if not s["passed"]]
    adjudicated = _adjudicate(graph, net, feeds, failed, onnx_out, torch_out, atol, rtol) if failed else {}
    refused = [v for v in failed if not adjudicated[v]["accepted"]]
    main = feeds[graph.main_input]
    report = {
        "passed": not refused,
        "failed": refused,
        "atol": atol,
        "rtol": rtol,
        "batch": int(main.shape[0]) if main.ndim else 1,
        "inputs": {n: list(np.asarray(x).shape) for n, x in feeds.items()},
        "reference": "onnxruntime CPU vs torch CPU, float32, random 0..255 images through the recorded mean/scale; "
                     "disagreements judged against torch float64",
        "checker": "onnx.checker full_check passed",
        "blobs": {v: {k: (round(val, 9) if isinstance(val, float) else val) for k, val in s.items()} for v, s in blobs.items()},
        "adjudicated": {v: {k: (float(f"{val:.6g}") if isinstance(val, float) else val) for k, val in a.items()}
                        for v, a in adjudicated.items()},
    }
    if refused:
        raise GraftError(_refusal(graph, report, refused))
    return report
