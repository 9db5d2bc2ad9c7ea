"""``graft finetune``: a thin argparse wrapper around :func:`finetune.train.finetune`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from convert.cli_common import (
    add_image_inputs,
    device,
    fraction,
    non_negative,
    non_negative_float,
    number,
    positive,
    positive_float,
    positive_ints,
    sigterm_as_interrupt,
)


def register(subparsers: Any) -> None:
    """Add the ``finetune`` subcommand to graft's command line."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a converted model end to end (Caffe solver semantics) into a new model package",
        description="Cut the model's deploy net at a blob, append a new InnerProduct (+ Softmax 'prob' for a classifier; "
        "one output and EuclideanLoss for a regression task such as --task age), train it in "
        "torch with Caffe's SGD (per-layer lr_mult/decay_mult, lr policies, solver.prototxt), checkpoint every epoch "
        "(re-running resumes), and write a caffemodel + prototxt converted into an ordinary model package.",
    )
    p.add_argument("--model", required=True, help="model package: a name under artifacts/models/ or a folder")
    t = p.add_argument_group("task")
    t.add_argument("--task", help="built-in task (gender, age, age-group, identity, label, ...) or a name for --label-column")
    t.add_argument("--label-column", help="label column of the input")
    t.add_argument("--kind", choices=("classification", "regression"), help="with --label-column: classification (Softmax) or regression (one output, EuclideanLoss)")
    t.add_argument("--where", action="append", metavar="COLUMN=VALUE", help="keep only these rows (repeatable)")
    add_image_inputs(p, "input (exactly one, as for extract)", "CSV with a path column and label columns")
    s = p.add_argument_group("split (validation rows are never trained on)")
    s.add_argument("--split-column", default="split", help="train/test column, used when present (default split)")
    s.add_argument("--group-column", help="rows sharing this value stay on one side (identical images always do)")
    s.add_argument("--test-size", type=fraction, default=0.2, help="validation fraction without a split column (default 0.2)")
    n = p.add_argument_group("net")
    n.add_argument("--from-blob", metavar="BLOB", help="blob the new layer reads (default: the input of the last InnerProduct, e.g. fc7)")
    n.add_argument("--new-layer", metavar="NAME", help="name of the new InnerProduct (default <last InnerProduct>_<task>)")
    n.add_argument("--init", choices=("gaussian", "xavier"), default="gaussian",
                   help="new weights: gaussian std 0.01 (default) or xavier; bias 0 (regression: the training targets' mean)")
    n.add_argument("--lr-mult", action="append", default=[], metavar="LAYER=MULT[,BIAS_MULT]",
                   help="override the prototxt's lr_mult (fnmatch globs; repeatable; later wins)")
    n.add_argument("--freeze", action="append", default=[], metavar="A:B|LAYER,...",
                   help="lr_mult 0 for a range of layers in net order (ends inclusive, may be open) or names/globs")
    o = p.add_argument_group("solver (defaults < --solver file < these flags)")
    o.add_argument("--solver", metavar="FILE", help="Caffe solver.prototxt (base_lr, lr_policy, gamma, stepsize, max_iter, ...)")
    o.add_argument("--lr", type=positive_float, dest="base_lr", help="base_lr (default 0.001)")
    o.add_argument("--lr-policy", choices=("fixed", "step", "multistep", "exp", "inv", "poly", "sigmoid"), help="default fixed")
    o.add_argument("--gamma", type=number, help="step, multistep, exp, inv, sigmoid (negative: a rising sigmoid)")
    o.add_argument("--power", type=non_negative_float, help="inv, poly")
    o.add_argument("--stepsize", type=positive, help="iterations (step, sigmoid)")
    o.add_argument("--stepvalue", type=positive_ints, metavar="I[,I...]", help="iterations (multistep)")
    o.add_argument("--max-iter", type=positive, help="iterations to run (and poly's horizon); default from --epochs")
    o.add_argument("--momentum", type=non_negative_float, help="default 0.9")
    o.add_argument("--weight-decay", type=non_negative_float, help="default 0.0005")
    o.add_argument("--clip-gradients", type=positive_float, metavar="NORM",
                   help="Caffe's clip_gradients: scale gradients down to this global L2 norm (default off; steadies regression)")
    r = p.add_argument_group("training")
    r.add_argument("--epochs", type=positive, help="passes over the training images (default: max_iter, else 10)")
    r.add_argument("--batch-size", type=positive, default=32, help="images per iteration (default 32)")
    r.add_argument("--mirror", action="store_true", help="random horizontal flips (Caffe's mirror: true)")
    r.add_argument("--seed", type=non_negative, help="split, initialisation, order, augmentation, dropout (default: solver random_seed, else 0)")
    r.add_argument("--device", type=device, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="auto: CUDA when visible; cuda:N: GPU N")
    r.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    r.add_argument("--workers", type=non_negative, help="image decode threads (default min(4, cores); 0 decodes inline)")
    r.add_argument("--threads", type=positive, help="torch CPU threads (default: the cores this process may use)")
    w = p.add_argument_group("output")
    w.add_argument("--name", help="new package name (default <model>-<task>)")
    w.add_argument("--out", metavar="DIR", help="package folder (default artifacts/models/<name>)")
    w.add_argument("--run-dir", metavar="DIR", help="checkpoints and report (default artifacts/finetune/<name>)")
    w.add_argument("--restart", action="store_true", help="discard an existing run in the run folder instead of resuming it")
    w.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    w.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=run_finetune)



def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_finetune(args: argparse.Namespace) -> int:
    """CLI entry: build the solver, load the records, train (or resume), print where things went."""
    from convert.errors import GraftError
    from extract.preprocess import ImageError
    from extract.sources import SourceError, load_records
    from finetune.solver import build_solver
    from heads.tasks import resolve_task

    spec = resolve_task(args.task, args.label_column, args.kind)
    solver = build_solver(args.solver, base_lr=args.base_lr, lr_policy=args.lr_policy, gamma=args.gamma, power=args.power,
                          stepsize=args.stepsize, stepvalue=args.stepvalue, max_iter=args.max_iter, momentum=args.momentum,
                          weight_decay=args.weight_decay, clip_gradients=args.clip_gradients)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    try:
        records = load_records(images=args.images, csv=args.csv, list_file=args.list_file, root=args.root,
                               path_column=args.path_column)
        from finetune.train import finetune  # torch: only once the input is known to be good

        old = signal.signal(signal.SIGTERM, sigterm_as_interrupt)  # a scheduler's kill: the last checkpoint stands
        try:
            res = finetune(
                args.model, records, spec, from_blob=args.from_blob, new_layer=args.new_layer, init=args.init,
                lr_mult=args.lr_mult, freeze=args.freeze, solver=solver, epochs=args.epochs, batch_size=args.batch_size,
                mirror=args.mirror, where=args.where, split_column=args.split_column, group_column=args.group_column,
                test_size=args.test_size, seed=args.seed, name=args.name, out=args.out, run_dir=args.run_dir,
                device=args.device, precision=args.precision, workers=args.workers, threads=args.threads or _cpu_count(),
                restart=args.restart, progress=not args.no_progress, plots=not args.no_plots, log=log,
            )
        finally:
            signal.signal(signal.SIGTERM, old)
    except (SourceError, ImageError) as err:
        raise GraftError(str(err)) from err
    v = res.report["validation"]
    m, b = v["metrics"], v["baseline"]
    if spec.kind == "regression":
        r2 = "n/a" if m["r2"] is None else f"{m['r2']:.4f}"
        print(f"{res.package.name}: {res.report['epochs']} epochs; validation ({v['n_val']} images) RMSE {m['rmse']:.4g} "
              f"(baseline {b['rmse']:.4g}), MAE {m['mae']:.4g}, R² {r2}; output blob {res.surgery.output}")
    else:
        print(f"{res.package.name}: {res.report['epochs']} epochs; validation ({v['n_val']} images) balanced accuracy "
              f"{m['balanced_accuracy']:.4f} (baseline {b['balanced_accuracy']:.4f}), accuracy {m['accuracy']:.4f}")
    print(f"package: {res.package.dir}")
    print(f"report: {res.run_dir / 'report.md'}; caffe: {res.report['caffe']['caffemodel']}")
    return 0
