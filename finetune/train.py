"""``finetune``: a model package and labelled images in, a fine-tuned model package out.

Steps: labels and an honest split (``data``) -> cut the deploy prototxt and append a classifier
or a regressor (``surgery``) -> per-blob multipliers (``multipliers``) -> a torch net from that
prototxt and the package's weights -> epochs of Caffe SGD (``loop``, ``optim``, ``policies``), a
checkpoint after each (``checkpoint``) -> caffemodel + prototxt -> ``convert_model`` (``export``)
-> report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from google.protobuf import text_format

from convert import ModelPackage, load_package
from convert.emit_torch import CaffeNet, emit_torch
from convert.errors import GraftError
from convert.ir import Graph, build_graph
from convert.parse import net_spec
from convert.paths import models_root, runs_root
from convert.store import WEIGHTS_FILE, group_by_layer, read_safetensors
from extract.pipeline import resolve_preprocess
from finetune import checkpoint as ckpt_io
from finetune.data import TrainData, epoch_plan, iter_batches, load_data, load_train_image
from finetune.export import export_package, write_caffe
from finetune.loop import Runtime, predict, progress_bar, train_epoch, val_stats
from finetune.multipliers import LayerMults, from_prototxt, resolve, write_back
from finetune.optim import CaffeSGD
from finetune.report import regression_scores, validation_scores, write_report
from finetune.solver import Solver, build_solver, with_max_iter
from finetune.surgery import Surgery, cut_and_append, new_layer_bias, new_layer_weights
from heads.persist import library_versions, now
from heads.tasks import TaskSpec

DEFAULT_EPOCHS = 10


@dataclass
class FinetuneResult:
    """The fine-tuned package, the run folder, the report, and the trained torch net (CPU, eval)."""

    package: ModelPackage
    run_dir: Path
    report: dict
    net: CaffeNet
    graph: Graph
    surgery: Surgery


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """CUDA when present (bf16 autocast by default there), else CPU in float32; ``cuda:N`` trains
    on GPU N, parsed and checked as extract's ``--device`` is."""
    from extract.backends import BackendError, auto_cuda_precision, check_torch_cuda, parse_device

    try:
        kind = parse_device(device)[0]
        if kind == "auto":
            kind = device = "cuda" if torch.cuda.is_available() else "cpu"
        if kind == "cuda":
            check_torch_cuda(device)
        if precision == "auto":
            precision = auto_cuda_precision(device) if kind == "cuda" else "fp32"
    except BackendError as err:
        raise GraftError(str(err)) from None
    if precision not in ("fp32", "bf16"):
        raise GraftError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    return Runtime(device=torch.device(device), precision=precision)


def build_net(pkg: ModelPackage, surgery: Surgery, seed: int) -> tuple[Graph, CaffeNet]:
    """The cut net with the package's weights and the new layer's fillers, as a trainable module."""
    spec = net_spec(surgery.net, source=f"{pkg.name} cut at {surgery.from_blob}")
    shape = pkg.input_shape
    shapes = {pkg.input_name: [1 if shape[0] is None else shape[0]] + list(shape[1:])}
    bare = build_graph(spec, None, input_shapes=shapes)
    in_shape = bare.node(surgery.new_layer).in_shapes[0]
    weights = group_by_layer(read_safetensors(pkg.dir / WEIGHTS_FILE))
    weights[surgery.new_layer] = new_layer_weights(surgery, math.prod(in_shape[1:]), seed)
    graph = build_graph(spec, weights, weights_source=WEIGHTS_FILE, input_shapes=shapes)
    return graph, emit_torch(graph)


def param_groups(net: CaffeNet, mults: list[LayerMults]) -> list[dict]:
    """One optimiser group per trained blob; frozen blobs (lr_mult 0) get ``requires_grad=False``."""
    for p in net.parameters():
        p.requires_grad_(False)
    groups = []
    for lm in mults:
        if lm.frozen:  # includes BatchNorm, whose statistics are buffers, not parameters
            continue
        params = list(net.layers[lm.name].parameters())
        if len(params) != len(lm.mults):
            raise GraftError(f"layer '{lm.name}': {len(params)} torch parameters for {len(lm.mults)} Caffe blobs")
        for i, (p, (lr, decay)) in enumerate(zip(params, lm.mults)):
            if lr > 0:
                p.requires_grad_(True)
                groups.append({"params": [p], "lr_mult": lr, "decay_mult": decay, "name": f"{lm.name}.{i}"})
    if not groups:
        raise GraftError("every layer is frozen (lr_mult 0): nothing to train")
    return groups


def run_length(n_train: int, batch_size: int, epochs: int | None, solver: Solver) -> tuple[int, int]:
    """(epochs, total iterations): ``epochs`` when given, else the solver's ``max_iter`` (the last
    epoch partial), else :data:`DEFAULT_EPOCHS`."""
    per_epoch = math.ceil(n_train / batch_size)
    if epochs is None and solver.schedule.max_iter:
        return math.ceil(solver.schedule.max_iter / per_epoch), solver.schedule.max_iter
    epochs = epochs or DEFAULT_EPOCHS
    return epochs, epochs * per_epoch


def restore(state: dict, net: CaffeNet, opt: CaffeSGD, rt: Runtime) -> tuple[int, int, list[dict], dict[str, str]]:
    """Load a checkpoint into the net, the optimiser and torch's RNG; (epoch, iteration, history, skipped)."""
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    if rt.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], rt.device)
    return state["epoch"], state["iteration"], list(state["history"]), dict(state["skipped"])


def _config(pkg: ModelPackage, spec: TaskSpec, data: TrainData, surgery: Surgery, solver: Solver, *,
            batch_size: int, mirror: bool, seed: int, precision: str) -> dict[str, Any]:
    """What decides the trained weights (not the epoch count: a run may be extended)."""
    fingerprint = hashlib.sha256(json.dumps(data.fingerprint()).encode()).hexdigest()
    sched = solver.as_dict()
    if sched["lr_policy"] != "poly":
        sched.pop("max_iter")  # only poly's rate depends on it; elsewhere it is just where to stop
    return {
        "format": ckpt_io.FORMAT,
        "base_model": {"name": pkg.name, "weights_sha256": pkg.weights_sha256},
        "net": {"from_blob": surgery.from_blob, "new_layer": surgery.new_layer,
                "prototxt_sha256": hashlib.sha256(text_format.MessageToString(surgery.net).encode()).hexdigest()},
        # the kind is recorded for regression only, so that classification runs written before regression
        # existed still resume: a missing kind means classification, and either way the kinds differ
        "task": {"name": spec.name, "label_column": spec.label_column, "classes": data.classes,
                 **({"kind": spec.kind} if spec.kind != "classification" else {})},
        "data": {"images_sha256": fingerprint, "n_train": int(len(data.train)), "n_val": int(len(data.val))},
        "solver": sched,
        "batch_size": batch_size,
        "mirror": mirror,
        "seed": seed,
        "precision": precision,
    }


def finetune(
    model: str | os.PathLike | ModelPackage,
    records: pd.DataFrame,
    spec: TaskSpec,
    *,
    from_blob: str | None = None,
    new_layer: str | None = None,
    init: str = "gaussian",
    lr_mult: Sequence[str] = (),
    freeze: Sequence[str] = (),
    solver: Solver | None = None,
    epochs: int | None = None,
    batch_size: int = 32,
    mirror: bool = False,
    where: list[str] | None = None,
    split_column: str | None = "split",
    group_column: str | None = None,
    test_size: float = 0.2,
    seed: int | None = None,
    name: str | None = None,
    out: str | os.PathLike | None = None,
    run_dir: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    threads: int | None = None,
    restart: bool = False,
    progress: bool = True,
    plots: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``model`` on ``records`` for ``spec``; resumes a run of the same configuration.

    A classification task gets a new InnerProduct with one output per class and Softmax ``prob``
    (loss: SoftmaxWithLoss); a regression task one output, no Softmax, its bias initialised to the
    training targets' mean (loss: EuclideanLoss).

    ``solver`` defaults to :func:`finetune.solver.build_solver` (lr 0.001 fixed, momentum 0.9,
    weight decay 0.0005). Training stops after ``epochs`` (default: the solver's ``max_iter``,
    else 10 epochs). ``on_epoch_end(history_row)`` runs after each epoch's checkpoint is written.
    """
    t0 = time.perf_counter()
    pkg = model if isinstance(model, ModelPackage) else load_package(model)
    if batch_size < 1:
        raise GraftError(f"--batch-size must be positive, got {batch_size}")
    if epochs is not None and epochs < 1:
        raise GraftError(f"--epochs must be positive, got {epochs}")
    solver = solver or build_solver()
    seed = seed if seed is not None else (solver.seed if solver.seed is not None else 0)
    rt = resolve_runtime(device, precision)
    if threads:
        torch.set_num_threads(threads)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    data = load_data(records, spec, where=where, split_column=split_column, group_column=group_column,
                     test_size=test_size, seed=seed, workers=max(1, workers))
    regression = data.regression
    target_mean = float(np.mean(data.target[data.train])) if regression else 0.0
    surgery = cut_and_append(pkg, 1 if regression else len(data.classes), task=spec.name, from_blob=from_blob,
                             new_layer=new_layer, init=init, softmax=not regression, bias=target_mean)
    graph, net = build_net(pkg, surgery, seed)
    mults = resolve(from_prototxt(surgery.net, {n.name: len(n.weights) for n in graph.nodes}), surgery.layer_names,
                    lr_mult=lr_mult, freeze=freeze, cut=surgery.cut)
    for lm in mults:
        if lm.name == surgery.new_layer and lm.why == "prototxt":
            lm.why = "new layer (Caffe's usual)"
    write_back(surgery.net, mults)
    groups = param_groups(net, mults)
    trained = [lm.name for lm in mults if not lm.frozen]

    epochs, total_iters = run_length(len(data.train), batch_size, epochs, solver)
    solver = with_max_iter(solver, total_iters)
    name = name or f"{pkg.name}-{spec.name}"
    run_dir = Path(run_dir) if run_dir is not None else runs_root() / name
    out = Path(out) if out is not None else models_root() / name
    if out.resolve() == Path(pkg.dir).resolve():
        raise GraftError(f"the fine-tuned package would replace the base model '{pkg.name}' ({out}); give another --name or --out")
    config = _config(pkg, spec, data, surgery, solver, batch_size=batch_size, mirror=mirror, seed=seed,
                     precision=rt.precision)
    state = ckpt_io.open_run(run_dir, config, restart=restart)
    for note in solver.notes:  # said once the input is known to be good, so that an error stays one line
        log(f"note: {note}")
    log(f"{spec.name}: {len(data.train)} train / {len(data.val)} validation images ({data.split.source}); "
        f"{data.describe(data.train)}")
    head = (f"{surgery.new_layer} (1 output, bias from the train mean {target_mean:.4g}), EuclideanLoss" if regression
            else f"{surgery.new_layer} ({len(data.classes)}) + prob")
    log(f"net: {pkg.name} cut at '{surgery.from_blob}' + {head}; "
        f"training {len(trained)} of {len(mults)} learnable layers ({', '.join(trained[:6])}{', ...' if len(trained) > 6 else ''})")

    rt.prepare(net)
    opt = CaffeSGD(groups, momentum=solver.momentum, weight_decay=solver.weight_decay,
                   regularization=solver.regularization, clip_gradients=solver.clip_gradients)
    start, iteration, history, skipped = 0, 0, [], {}
    if state is not None:
        if state["epoch"] > epochs:
            raise GraftError(f"{run_dir} already holds {state['epoch']} epochs, more than --epochs {epochs}; "
                             f"re-run with --restart to train a shorter run")
        start, iteration, history, skipped = restore(state, net, opt, rt)
        log(f"resuming {run_dir} after epoch {start} (iteration {iteration})")
    else:
        torch.manual_seed(seed)

    pp = resolve_preprocess(pkg)
    shape = pp.input_shape()
    paths = data.meta["path"].astype(str).tolist()
    logits_blob = surgery.new_layer

    def validate(bar_desc: str) -> tuple[np.ndarray, np.ndarray]:
        rows = data.val
        bar = progress_bar(len(rows), bar_desc, progress)
        try:
            proba, pos, failed = predict(net, iter_batches(rows, lambda r: pp.load(paths[r]), batch_size, workers=workers,
                                                           shape=shape), logits_blob=logits_blob, rt=rt, bar=bar,
                                            softmax=not regression)
        finally:
            bar.close()
        for p, why in failed:
            skipped[paths[rows[p]]] = why
        if len(pos) == 0:
            raise GraftError(f"none of the {len(rows)} validation images could be decoded (e.g. {next(iter(skipped.values()), '?')})")
        return proba, rows[pos]

    last_val: tuple[np.ndarray, np.ndarray] | None = None
    for epoch in range(start, epochs):
        if iteration >= total_iters:
            break
        t_epoch = time.perf_counter()
        order, crops, flips = epoch_plan(len(data.train), seed, epoch, mirror)
        rows = data.train[order]
        items = list(zip(rows.tolist(), map(tuple, crops), flips.tolist()))
        bar = progress_bar(len(items), f"epoch {epoch + 1}/{epochs}", progress)
        try:
            stats, iteration, failed = train_epoch(
                net, opt, iter_batches(items, lambda it: load_train_image(pp, paths[it[0]], it[1], it[2]), batch_size,
                                       workers=workers, shape=shape),
                data.target[rows], logits_blob=logits_blob, schedule=solver.schedule, iteration=iteration,
                stop_at=total_iters, rt=rt, bar=bar, regression=regression)
        finally:
            bar.close()
        for p, why in failed:
            skipped[paths[rows[p]]] = why
        if stats["train_images"] == 0:
            raise GraftError(f"epoch {epoch + 1}: no training image could be decoded (e.g. {next(iter(skipped.values()), '?')})")
        last_val = validate("validate")
        vstats = val_stats(last_val[0], data.target[last_val[1]], regression=regression)
        row = {"epoch": epoch + 1, "iteration": iteration, **stats, **vstats,
               "epoch_seconds": time.perf_counter() - t_epoch}
        history.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None}
        ckpt_io.save_checkpoint(run_dir, config, {"epoch": epoch + 1, "iteration": iteration, "model": net.state_dict(),
                                                  "optimizer": opt.state_dict(), "history": history, "skipped": skipped,
                                                  "rng": rng})
        left = np.mean([h["epoch_seconds"] for h in history[start:]]) * (epochs - epoch - 1)
        if regression:
            scores = (f"train loss {stats['train_loss']:.4g} rmse {stats['train_rmse']:.4g} | val loss {vstats['val_loss']:.4g}"
                      f" rmse {vstats['val_rmse']:.4g} mae {vstats['val_mae']:.4g} r2 {vstats['val_r2']:.3f}")
        else:
            scores = (f"train loss {stats['train_loss']:.4f} acc {stats['train_accuracy']:.3f} | val loss {vstats['val_loss']:.4f}"
                      f" acc {vstats['val_accuracy']:.3f} balanced {vstats['val_balanced_accuracy']:.3f}")
        log(f"epoch {epoch + 1}/{epochs}: lr {stats['lr']:.3g}, {scores} | {stats['images_per_s']:.0f} img/s"
            + (f", ~{left:.0f} s left" if left >= 1 else ""))
        if on_epoch_end is not None:
            on_epoch_end(history[-1])
    if not history:
        raise GraftError(f"{run_dir}: no epoch was trained (the solver's max_iter is 0?)")
    if last_val is None:  # the run was already complete: score its final weights
        last_val = validate("validate")

    net.eval().cpu()
    prototxt, caffemodel = write_caffe(run_dir, name, surgery.net, graph, net)
    t_export = time.perf_counter()
    package = export_package(prototxt, caffemodel, pkg, name=name, out=out, classes=data.classes or None, log=log)
    proba, rows = last_val
    if regression:
        scores = regression_scores(proba, data.target[rows], data.target[data.train])
    else:
        scores = validation_scores(proba, data.target[rows], data.target[data.train], data.classes)
    report = _report(name, pkg, spec, data, surgery, mults, solver, history, scores, package, prototxt, caffemodel,
                     rt=rt, batch_size=batch_size, mirror=mirror, seed=seed, skipped=skipped,
                     timings={"data_and_train_s": round(t_export - t0, 3), "export_s": round(time.perf_counter() - t_export, 3), "total_s": round(time.perf_counter() - t0, 3)})
    write_report(run_dir, report, plots=plots, val=(data.target[rows], proba) if regression else None)
    _write_predictions(run_dir / "val_predictions.csv", data, proba, rows)
    return FinetuneResult(package=package, run_dir=run_dir, report=report, net=net, graph=graph, surgery=surgery)


def _write_predictions(path: Path, data: TrainData, proba: np.ndarray, rows: np.ndarray) -> None:
    """``val_predictions.csv``: path, true class, predicted class, p_<class> per validation image;
    for a regressor path, true value, prediction."""
    if data.regression:
        pd.DataFrame({"path": data.meta["path"].to_numpy()[rows], "true": data.target[rows],
                      "prediction": proba.reshape(len(rows))}).to_csv(path, index=False)
        return
    names = np.asarray(data.classes, dtype=object)
    df = pd.DataFrame({"path": data.meta["path"].to_numpy()[rows], "true": names[data.target[rows]],
                       "prediction": names[proba.argmax(1)]})
    for i, c in enumerate(data.classes):
        df[f"p_{c}"] = proba[:, i]
    df.to_csv(path, index=False)


def _report(name, pkg, spec, data, surgery, mults, solver, history, scores, package, prototxt, caffemodel, *,
            rt, batch_size, mirror, seed, skipped, timings) -> dict:
    pp = pkg.preprocess or {}
    augmentation = (["random crop"] if pp.get("crop") else []) + (["random mirror"] if mirror else [])
    batch_norm = [layer.name for layer in surgery.net.layer if layer.type == "BatchNorm"]
    return {
        "name": name,
        "created": now(),
        "base_model": {"name": pkg.name, "weights_sha256": pkg.weights_sha256, "dir": str(pkg.dir)},
        "task": {"name": spec.name, "label_column": spec.label_column, "kind": spec.kind},
        "classes": data.classes,
        "data": {"n_train": int(len(data.train)), "n_val": int(len(data.val)), "split": data.split.source,
                 **({"target": {"train": data.target_summary(data.train), "validation": data.target_summary(data.val)}}
                    if data.regression else
                    {"class_counts": {"train": data.class_counts(data.train), "validation": data.class_counts(data.val)}}),
                 "dropped": data.dropped},
        "skipped_images": skipped,
        "net": {"from_blob": surgery.from_blob, "bottom": surgery.bottom, "new_layer": surgery.new_layer,
                "output": surgery.output, "loss": "EuclideanLoss" if data.regression else "SoftmaxWithLoss",
                **({"bias_init": float(new_layer_bias(surgery))} if data.regression else {}),
                "kept_layers": surgery.kept, "cut_layers": surgery.cut, "batch_norm_global_stats": batch_norm,
                "multipliers": [{"layer": lm.name, "type": lm.type, "lr_mult": [m[0] for m in lm.mults],
                                 "decay_mult": [m[1] for m in lm.mults], "from": lm.why} for lm in mults]},
        "solver": solver.as_dict(),
        "solver_file": solver.source,
        "solver_notes": list(solver.notes),
        "epochs": history[-1]["epoch"],
        "iterations": history[-1]["iteration"],
        "batch_size": batch_size,
        "augmentation": augmentation,
        "device": str(rt.device),
        "precision": rt.precision,
        "seed": seed,
        "history": history,
        "validation": scores,
        "package": str(package.dir),
        "caffe": {"prototxt": str(prototxt), "caffemodel": str(caffemodel)},
        "timings": timings,
        "versions": {**library_versions(), "torch": torch.__version__},
    }
