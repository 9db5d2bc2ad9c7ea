"""``fit-head``, ``predict`` and ``export``: thin argparse wrappers around heads' library functions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from convert.cli_common import (
    at_least,
    device,
    floats,
    fraction,
    non_negative,
    positive,
    positive_floats,
    positive_ints,
)
from convert.errors import GraftError

ALLOW_PICKLE_HELP = ("also load a head saved by an older graft as head.joblib: a pickle, which runs code from the file "
                     "when loaded; only for heads you trust")
#: heads.tasks.BUILTIN_TASKS' names, listed here so ``--help`` does not import pandas (a test keeps them equal)
TASK_NAMES = ("gender", "age", "age-group", "young-old", "identity", "label")


def register(subparsers: Any) -> None:
    """Add ``fit-head``, ``predict`` and ``export`` to graft's command line."""
    p = subparsers.add_parser(
        "fit-head",
        help="fit a light head (logreg / ridge / MLP) on cached embeddings, with an honest test report",
        description="Train a head on extract's cached features of one blob. Hyper-parameters (and the head, with "
        "--head auto) are chosen by cross-validation on the training split only; the test split is scored once, "
        "beside a majority / mean baseline. Writes the head (head.json + head.npz: data, no pickle), card.json, report.{json,md} and plots.",
    )
    t = p.add_argument_group("task")
    t.add_argument("--task", help=f"built-in task ({', '.join(TASK_NAMES)}) or a name for --label-column")
    t.add_argument("--label-column", help="label column (cache metadata or --labels CSV)")
    t.add_argument("--kind", choices=("classification", "regression"), help="with --label-column")
    t.add_argument("--labels", metavar="CSV", help="labels joined on image path (or file name) instead of the cache's own")
    t.add_argument("--labels-path-column", metavar="NAME", help="path column of --labels (default: path, file, ...)")
    t.add_argument("--where", action="append", metavar="COLUMN=VALUE", help="keep only these rows (repeatable)")
    f = p.add_argument_group("features")
    f.add_argument("--model", help="model package (name under artifacts/models/ or folder); its default cache is read")
    f.add_argument("--layer", required=True, help="blob whose cached embeddings to use")
    f.add_argument("--cache", metavar="DIR", help="cache folder (default: artifacts/cache/<model>)")
    f.add_argument("--cache-key", metavar="KEY", help="cache key, when several hold the layer")
    f.add_argument("--dataset", metavar="NAME", help="the extracted dataset to train on (default: the most recently "
                   "extracted; predict's datasets are never the default)")
    h = p.add_argument_group("head and search")
    h.add_argument("--head", default="auto", choices=("auto", "logreg", "ridge", "mlp"),
                   help="auto: chosen by CV among logreg / ridge / mlp (regression: ridge / mlp)")
    h.add_argument("--preprocess", default="standardize", metavar="MODE[,MODE]",
                   help="none, standardize, l2, l2+standardize; several are compared by CV (default standardize)")
    h.add_argument("--pca", type=positive, metavar="N", help="project on N principal components after preprocessing")
    h.add_argument("--alphas", type=positive_floats, metavar="A,B,...", help="penalties to try (default: a grid per head)")
    h.add_argument("--hidden", type=positive_ints, default=(256,), metavar="N[,N]", help="MLP hidden layer sizes (default 256)")
    h.add_argument("--max-iter", type=positive, default=300, help="iterations per fit (logreg L-BFGS, MLP epochs)")
    h.add_argument("--mlp-backend", choices=("auto", "sklearn", "torch"), default="auto",
                   help="who trains the MLP: auto = torch on a GPU for large data (rows x dims >= 2e7), else scikit-learn")
    h.add_argument("--cv", type=at_least(2), default=5, help="CV folds on the training split (default 5)")
    h.add_argument("--holdout", type=fraction, help="one validation fold of this size instead of k-fold "
                   "(automatic, 0.2, above 20,000 training rows)")
    h.add_argument("--scoring", help="classification: balanced_accuracy (default), accuracy; regression: neg_rmse (default), r2")
    h.add_argument("--seed", type=non_negative, default=0, help="seed of splits, folds and fits (default 0)")
    h.add_argument("--clip-range", type=clip_range, default="train", metavar="train|none|LOW,HIGH",
                   help="regression: clip predictions to the training labels' range (default train), to LOW,HIGH, or not (none)")
    s = p.add_argument_group("split")
    s.add_argument("--split-column", default="split", help="train/test column, used when present (default split)")
    s.add_argument("--group-column", help="rows sharing this value stay on one side of every split (e.g. identity)")
    s.add_argument("--test-size", type=fraction, default=0.2, help="hold-out fraction without a split column (default 0.2)")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="head folder (default artifacts/heads/<task>-<model>-<layer>)")
    o.add_argument("--no-learning-curve", action="store_true", help="skip the learning curve (refits per size)")
    o.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    o.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_fit_head)

    p = subparsers.add_parser("predict", help="predict images with a saved head, or with a classifier package itself",
                              description="Embed images with the head's model and blob (reusing extract's cache), "
                              "apply the head, write a CSV: path, prediction, p_<class>..., error. Without --head, "
                              "--model's own output (e.g. a fine-tuned net's prob) is reported, named by its classes.")
    p.add_argument("--head", metavar="DIR", help="head folder written by fit-head")
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--images", metavar="DIR", help="folder of images (recursive)")
    src.add_argument("--csv", metavar="FILE", help="CSV with a path column")
    src.add_argument("--path-column", metavar="NAME")
    src.add_argument("--root", metavar="DIR", help="folder relative --csv paths resolve against")
    p.add_argument("--out", required=True, metavar="CSV")
    p.add_argument("--model", help="with --head: the model package, when it moved since fit-head (checked against "
                   "the card); alone: the classifier package whose output to report")
    p.add_argument("--blob", help="without --head: the output blob to report (default: the package's first output)")
    p.add_argument("--top-k", type=positive, default=5, help="without --head, above 20 classes: top classes listed (default 5)")
    p.add_argument("--cache", metavar="DIR", help="cache folder (default: artifacts/cache/<model>)")
    p.add_argument("--backend", choices=("auto", "onnxruntime", "torch"), default="auto")
    p.add_argument("--device", type=device, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="as extract's: auto, cpu, cuda or cuda:N (GPU N)")
    p.add_argument("--batch-size", type=positive, help="images per forward (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--workers", type=positive, help="decode threads (default: min(4, cores) on CPU, min(16, cores) on CUDA)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser("export", help="one ONNX graph: image tensor in, the head's prediction out",
                              description="Fuse the model package's graph up to the head's blob with the head "
                              "(preprocessing + learner) into one ONNX file. Outputs: probabilities and label, or prediction.")
    p.add_argument("--head", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="FILE.onnx")
    p.add_argument("--model", help="model package, when it moved since fit-head (checked against the card)")
    p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.set_defaults(func=run_export)


def clip_range(text: str) -> str | tuple[float, float] | None:
    """``train``, ``none`` or ``LOW,HIGH`` (LOW < HIGH)."""
    if text.strip().lower() in ("train", "none"):
        return None if text.strip().lower() == "none" else "train"
    vals = floats(text)
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise argparse.ArgumentTypeError(f"expected train, none or LOW,HIGH with LOW < HIGH, got {text!r}")
    return (vals[0], vals[1])


def run_fit_head(args: argparse.Namespace) -> int:
    from heads.fit import fit_head_from_cache
    from heads.tasks import resolve_task

    spec = resolve_task(args.task, args.label_column, args.kind)
    modes = [m.strip() for m in args.preprocess.split(",") if m.strip()]
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    res = fit_head_from_cache(
        spec, model=args.model, layer=args.layer, cache=args.cache, cache_key=args.cache_key, dataset=args.dataset, labels=args.labels,
        labels_path_column=args.labels_path_column, head=args.head, preprocess=modes, n_components=args.pca,
        alphas=args.alphas, split_column=args.split_column, group_column=args.group_column, test_size=args.test_size,
        cv=args.cv, holdout=args.holdout, scoring=args.scoring, hidden_layer_sizes=args.hidden, max_iter=args.max_iter,
        mlp_backend=args.mlp_backend, seed=args.seed, clip_range=args.clip_range, where=args.where, with_learning_curve=not args.no_learning_curve, with_plots=not args.no_plots,
        out=args.out, log=log,
    )
    m, b = res.card["metrics"]["test"], res.card["metrics"]["baseline"]
    shown = ", ".join(f"{k} {m[k]:.4f} (baseline {b[k]:.4f})" for k in m if m[k] is not None and b.get(k) is not None)
    print(f"{res.card['name']}: {res.card['head']['type']} on {res.card['split']['n_train']} rows; test: {shown}")
    print(f"head: {res.path}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from heads.predict import predict_images, predict_with_model

    common = dict(images=args.images, csv=args.csv, path_column=args.path_column, root=args.root, out=args.out,
                  cache=args.cache, backend=args.backend, device=args.device, batch_size=args.batch_size,
                  workers=args.workers, progress=not args.no_progress)
    if args.head:
        if args.blob:
            raise GraftError("--blob is for predicting with a model alone; a head reads the blob it was fitted on")
        res = predict_images(args.head, model=args.model, allow_pickle=args.allow_pickle, **common)
    elif args.model:
        res = predict_with_model(args.model, blob=args.blob, top_k=args.top_k, **common)
    else:
        raise GraftError("predict needs --head DIR (a fitted head) or --model NAME (a classifier package)")
    failed = int((res["error"] != "").sum())
    print(f"{len(res) - failed} prediction(s) written to {args.out}" + (f"; {failed} image(s) failed (see `error`)" if failed else ""))
    return 1 if failed else 0


def run_export(args: argparse.Namespace) -> int:
    from heads.export import export_head

    info = export_head(args.head, args.out, model=args.model, allow_pickle=args.allow_pickle)
    print(f"wrote {info['path']}: input {info['input']} -> {info['blob']} -> {', '.join(info['outputs'])}")
    return 0
