"""``convert`` and ``inspect`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import non_negative, positive_float
from .errors import GraftError


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    """Preprocessing flags shared by convert and extract."""
    g = p.add_argument_group("preprocessing (recorded in the package; extract applies it)")
    g.add_argument("--mean", help="per-channel mean in the model's channel order, e.g. 104,117,123")
    g.add_argument("--mean-file", help="mean image: Caffe .binaryproto (1xCxHxW) or .npy (CxHxW); centre-cropped to the input")
    g.add_argument("--scale", type=positive_float, help="multiply after mean subtraction (default 1)")
    g.add_argument("--channel-order", choices=["bgr", "rgb", "gray"], help="channel order the net expects (default bgr)")
    g.add_argument("--resize", help="squash-resize to H[,W] before cropping (default: the input size)")
    g.add_argument("--crop", type=non_negative, help="centre crop to NxN after resizing (0 = none)")


#: prototxt stems that say nothing about the model (BVLC's and most zoos' file names)
GENERIC_STEMS = frozenset({"deploy", "deploy_full", "test", "train_val", "trainval", "train", "model", "net", "network", "solver"})


def default_name(out: str | None, preset: str | None, prototxt: str | None, caffemodel: str | None) -> str:
    """The package's name without ``--name``: the ``--out`` folder's name, the preset's, the
    prototxt's stem, or, when that is generic (``deploy.prototxt``), the caffemodel's stem.
    Caches, heads and fine-tuning runs are named after it."""
    if out:
        return Path(out).resolve().name
    if preset:
        return preset
    stem = Path(prototxt).stem if prototxt else ""
    if stem.lower().replace("-", "_") not in GENERIC_STEMS or not caffemodel:
        return stem or "model"
    return Path(caffemodel).stem


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Caffe model into a verified ONNX + PyTorch package",
                       description="Convert a Caffe model (prototxt + caffemodel, V1 or V2) into a model package.")
    p.add_argument("--prototxt", help="deploy prototxt (not needed with --preset)")
    p.add_argument("--caffemodel", required=True, help="trained weights")
    p.add_argument("--preset", help="a model graft knows: vgg-face (its deploy net and preprocessing); ultraface, mtcnn "
                   "(preprocessing for the released --prototxt)")
    p.add_argument("--name", help="package name (default: preset or prototxt name)")
    p.add_argument("--out", help="package folder (default artifacts/models/<name>)")
    p.add_argument("--classes", help="class names file, one per line (line i = class i)")
    p.add_argument("--input-size", help="override the net's input H[,W] (fully convolutional nets)")
    p.add_argument("--outputs", metavar="BLOB[,BLOB]",
                   help="keep only the layers these blobs need (the rest, supported or not, is left out and listed)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check (not recommended)")
    add_preprocess_args(p)
    p.set_defaults(func=_never_a_traceback(run_convert))

    q = sub.add_parser("inspect", help="show a package: layers, blobs, shapes, parameters, preprocessing, verification")
    q.add_argument("model", help="package name under artifacts/models/ or a package folder")
    q.add_argument("--json", action="store_true", help="print the manifest as JSON")
    q.set_defaults(func=_never_a_traceback(run_inspect))


def _never_a_traceback(run):
    """``convert``/``inspect``: running out of memory is an implausible input (a layer parameter,
    an input size), so it is reported as bad input; ``cli.main`` turns file errors into one line
    (exit status 2) and anything unexpected into one ``internal error`` line (exit status 3)."""
    import functools

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except MemoryError:
            raise GraftError("out of memory (is an input or a layer parameter implausibly large?)") from None

    return wrapped


def run_convert(args: argparse.Namespace) -> int:
    from .ir import main_input
    from .package import convert_model, input_shapes, read_spec
    from .preprocess import build_preprocess, parse_size
    from .presets import get_preset

    preset = get_preset(args.preset) if args.preset else None
    if not preset and not args.prototxt:
        raise GraftError("give --prototxt (or --preset vgg-face)")
    if preset and preset.prototxt is not None and args.prototxt:
        raise GraftError(f"give --prototxt or --preset {preset.name}, not both (the preset has its own deploy net)")
    if preset and preset.prototxt is None and not args.prototxt:
        raise GraftError(f"--preset {preset.name} is preprocessing only: give the released deploy net with --prototxt")
    preset_net = preset.prototxt if preset else None
    if not Path(args.caffemodel).is_file():
        what = "is a directory, expected a .caffemodel file" if Path(args.caffemodel).is_dir() else "no such file"
        raise GraftError(f"{args.caffemodel}: {what}")
    outputs = [o for o in (args.outputs or "").split(",") if o.strip()] or None
    if args.outputs is not None and not outputs:
        raise GraftError("--outputs: no blob names given")
    source = preset.name if preset_net is not None else args.prototxt
    spec = read_spec(source, preset_net, outputs)
    input_size = parse_size(args.input_size, "--input-size")
    shapes = input_shapes(spec, input_size)
    shape = shapes[main_input(shapes)]
    pre, mean_img = (None, None)
    if len(shape) == 4:
        pre, mean_img = build_preprocess(
            shape, mean=args.mean, mean_file=args.mean_file, scale=args.scale, channel_order=args.channel_order,
            resize=args.resize, crop=args.crop, defaults=preset.preprocess if preset else None)
    classes = None
    if args.classes:
        path = Path(args.classes)
        if not path.is_file():
            raise GraftError(f"{path}: no such file")
        classes = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    name = args.name or default_name(args.out, preset.name if preset else None, args.prototxt, args.caffemodel)
    pkg = convert_model(
        source, args.caffemodel, args.out, name,
        preprocess=pre, mean_image=mean_img, classes=classes, input_size=input_size,
        prototxt_text=preset_net, outputs=outputs, verify=not args.no_verify)
    m = pkg.manifest
    if classes and m["outputs"]:
        n_out = m["blobs"][m["outputs"][-1]]["shape"][-1]
        if n_out != len(classes):
            print(f"warning: {len(classes)} class names but output '{m['outputs'][-1]}' has {n_out} values")
    v = m["verification"]
    check = "skipped" if v.get("skipped") else f"{len(v['blobs'])} blobs agree (onnxruntime vs torch)"
    if v.get("adjudicated"):
        check += f", {len(v['adjudicated'])} after float64 adjudication"
    left = f", {len(m['left_out'])} layers left out (--outputs)" if m.get("left_out") else ""
    print(f"converted {name}: {m['params']['total']:,} parameters, {len(m['layers'])} layers{left}, verification {check}, "
          f"{m['timings_s']['total']:.1f} s -> {pkg.dir}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import json

    from .package import load_package

    pkg = load_package(args.model)
    if args.json:
        print(json.dumps(pkg.manifest, indent=1))
        return 0
    try:
        text = pkg.summary()
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise GraftError(f"{pkg.dir / 'manifest.json'}: incomplete or damaged manifest ({type(err).__name__}: {err})") from None
    print(text)
    return 0
