"""Per-blob learning-rate and weight-decay multipliers, as Caffe's ``param { lr_mult decay_mult }``.

Resolution, per learnable blob, later steps winning:

1. the prototxt's ``param`` specs (Caffe's default 1 / 1 for blobs without one);
2. ``--lr-mult PATTERN=M`` (every blob of the matching layers) or ``PATTERN=M1,M2`` (per blob),
   in the order given; patterns are fnmatch globs over layer names;
3. ``--freeze``: ``A:B`` (the layers from A to B in net order, ends inclusive, either end
   may be left open) or a comma list of names/globs: lr_mult 0, i.e. not trained at all.

BatchNorm's three blobs are statistics: lr_mult 0 always (Caffe's use_global_stats).

A pattern that matches no layer of the net is an error naming it (and saying when the layer
was cut off), never a silent no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from convert.errors import GraftError

#: layers whose blobs are statistics, not learned weights: Caffe fine-tunes them with lr_mult 0
#: (use_global_stats), and graft never changes them, whatever --lr-mult says
STATISTICS_LAYERS = frozenset({"BatchNorm"})
STATISTICS_WHY = "global statistics (use_global_stats), not learned"


@dataclass
class LayerMults:
    """One learnable layer of the net and its (lr_mult, decay_mult) per blob."""

    name: str
    type: str
    mults: list[tuple[float, float]]
    why: str = "prototxt"

    @property
    def frozen(self) -> bool:
        return all(lr == 0 for lr, _ in self.mults)


def from_prototxt(net, n_blobs: dict[str, int]) -> list[LayerMults]:
    """The multipliers a NetParameter declares for the layers that have blobs (net order)."""
    out = []
    for layer in net.layer:
        n = n_blobs.get(layer.name, 0)
        if n and layer.type in STATISTICS_LAYERS:
            out.append(LayerMults(layer.name, layer.type, [(0.0, 0.0)] * n, STATISTICS_WHY))
        elif n:
            specs = list(layer.param)
            mults = [(float(specs[i].lr_mult), float(specs[i].decay_mult)) if i < len(specs) else (1.0, 1.0) for i in range(n)]
            out.append(LayerMults(layer.name, layer.type, mults, "prototxt" if specs else "Caffe's default"))
    return out


def _match(pattern: str, names: Sequence[str], flag: str, cut: Sequence[str]) -> list[str]:
    hits = [n for n in names if fnmatchcase(n, pattern)]
    if not hits:
        gone = [n for n in cut if fnmatchcase(n, pattern)]
        if gone:
            raise GraftError(f"{flag}: layer {gone[0]!r} is not in the fine-tuned net (cut off above the --from-blob)")
        raise GraftError(f"{flag}: no layer matches {pattern!r}; layers: {', '.join(names)}")
    return hits


def parse_lr_mult(text: str) -> tuple[str, list[float]]:
    """``fc8_gender=10`` -> ("fc8_gender", [10.0]); ``fc8*=10,20`` -> ("fc8*", [10.0, 20.0])."""
    pattern, sep, values = text.partition("=")
    try:
        mults = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        mults = []
    if not sep or not pattern.strip() or not mults or any(m < 0 for m in mults):
        raise GraftError(f"--lr-mult takes LAYER=MULT or LAYER=WEIGHT_MULT,BIAS_MULT with non-negative numbers, got {text!r}")
    return pattern.strip(), mults


def freeze_targets(specs: Sequence[str], names: Sequence[str], cut: Sequence[str] = ()) -> list[str]:
    """Layer names selected by ``--freeze`` items (ranges ``A:B`` in net order, names, globs)."""
    out: list[str] = []
    for spec in specs:
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            if ":" in item:
                a, _, b = item.partition(":")
                a, b = a.strip(), b.strip()
                for end in (a, b):
                    if end and end not in names:
                        _match(end, names, "--freeze", cut)  # raises with the cut / known-layers message
                        raise GraftError(f"--freeze {item}: range ends must be layer names, not patterns ({end!r})")
                i = names.index(a) if a else 0
                j = names.index(b) if b else len(names) - 1
                if i > j:
                    raise GraftError(f"--freeze {item}: {a!r} comes after {b!r} in the net")
                out += names[i:j + 1]
            else:
                out += _match(item, names, "--freeze", cut)
    return list(dict.fromkeys(out))


def resolve(
    layers: list[LayerMults],
    all_names: Sequence[str],
    *,
    lr_mult: Sequence[str] = (),
    freeze: Sequence[str] = (),
    cut: Sequence[str] = (),
) -> list[LayerMults]:
    """Apply ``--lr-mult`` then ``--freeze`` to the prototxt's multipliers (see module doc).

    ``all_names`` are every layer of the net in order (with or without blobs: a pattern may
    name a parameter-free layer; a range may span them); ``cut`` the base layers cut off.
    """
    by_name = {lm.name: lm for lm in layers}
    for text in lr_mult:
        pattern, mults = parse_lr_mult(text)
        for name in _match(pattern, all_names, "--lr-mult", cut):
            lm = by_name.get(name)
            if lm is None or lm.type in STATISTICS_LAYERS:
                continue
            if len(mults) not in (1, len(lm.mults)):
                raise GraftError(f"--lr-mult {text}: layer {name!r} has {len(lm.mults)} blob(s), {len(mults)} multipliers given")
            values = mults * len(lm.mults) if len(mults) == 1 else mults
            lm.mults = [(v, d) for v, (_, d) in zip(values, lm.mults)]
            lm.why = f"--lr-mult {text}"
    for name in freeze_targets(freeze, list(all_names), cut):
        lm = by_name.get(name)
        if lm is not None:
            lm.mults = [(0.0, d) for _, d in lm.mults]
            lm.why = "--freeze"
    return layers


def write_back(net, layers: list[LayerMults]) -> None:
    """Record the effective multipliers in the NetParameter's ``param`` specs (what was trained)."""
    by_name = {lm.name: lm for lm in layers}
    for layer in net.layer:
        lm = by_name.get(layer.name)
        if lm is None:
            continue
        while len(layer.param) < len(lm.mults):
            layer.param.add()
        for spec, (lr, decay) in zip(layer.param, lm.mults):
            spec.lr_mult, spec.decay_mult = lr, decay
