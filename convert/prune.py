"""``convert --outputs``: keep only the layers that the named blobs need.

Pruning works on the :class:`NetSpec`, before any converter is looked up, so a layer outside
the kept part (a detection head, an unknown post-processing type) never has to convert.

Names are the package's value names: a Caffe blob name is the blob's *final* value (after
every in-place layer that writes it), ``<blob>/pre_<layer>`` the value just before ``<layer>``
overwrote it. So that the kept names mean what they mean in the whole net, every later writer
of a kept blob is kept as well (asking for ``fc7/pre_relu7`` keeps ``relu7`` and ``drop7``
too; the package's ``fc7`` is then Caffe's post-ReLU ``fc7``, as always).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .errors import GraftError
from .parse import NetSpec

Value = tuple[str, int]  # (caffe blob, version)


class _Versions:
    """Every value the net's layers write, named as ``ir.build_graph`` names them."""

    def __init__(self, spec: NetSpec):
        self.current: dict[str, Value] = {name: (name, 0) for name in spec.inputs}
        self.producer: dict[Value, int] = {}
        self.overwritten_by: dict[Value, str] = {}
        self.ins: list[list[Value]] = []
        self.outs: list[list[Value]] = []
        for i, ls in enumerate(spec.layers):
            # an undefined bottom is reported by build_graph, if its layer is kept
            self.ins.append([self.current[b] for b in ls.bottoms if b in self.current])
            outs = []
            for top in ls.tops:
                if top in self.current:
                    self.overwritten_by[self.current[top]] = ls.name
                    v = (top, self.current[top][1] + 1)
                else:
                    v = (top, 0)
                self.current[top] = v
                self.producer[v] = i
                outs.append(v)
            self.outs.append(outs)

    def name(self, v: Value) -> str:
        return v[0] if self.current.get(v[0]) == v else f"{v[0]}/pre_{self.overwritten_by[v]}"

    def by_name(self) -> dict[str, Value]:
        values = [(name, 0) for name in self.current if (name, 0) not in self.producer]
        values += [v for outs in self.outs for v in outs]
        return {self.name(v): v for v in values}


def prune(spec: NetSpec, outputs: Sequence[str], source: str = "prototxt") -> NetSpec:
    """The net cut down to what ``outputs`` need; ``left_out`` lists the layers dropped."""
    wanted = list(dict.fromkeys(o.strip() for o in outputs if o.strip()))
    if not wanted:
        raise GraftError("--outputs: no blob names given")
    ver = _Versions(spec)
    names = ver.by_name()
    unknown = [o for o in wanted if o not in names]
    if unknown:
        raise GraftError(f"--outputs: {source} has no blob {', '.join(map(repr, unknown))}; blobs: {', '.join(names)}")
    last = {b: v[1] for b, v in ver.current.items()}
    keep: set[int] = set()
    seen: set[Value] = set()
    todo = [names[o] for o in wanted]
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        i = ver.producer.get(v)
        if i is None or i in keep:
            continue
        keep.add(i)
        todo.extend(ver.ins[i])
        for blob, version in ver.outs[i]:  # later writers of a kept blob: names keep their meaning
            todo.extend((blob, k) for k in range(version + 1, last[blob] + 1))
    layers = [ls for i, ls in enumerate(spec.layers) if i in keep]
    left_out = [(ls.name, ls.type) for i, ls in enumerate(spec.layers) if i not in keep]
    read = {b for ls in layers for b in ls.bottoms} | set(wanted)
    inputs = {n: s for n, s in spec.inputs.items() if n in read or any(w.startswith(f"{n}/pre_") for w in wanted)}
    notes = list(spec.notes)
    if left_out:
        shown = ", ".join(f"{n} ({t})" for n, t in left_out[:8]) + (f", ... ({len(left_out) - 8} more)" if len(left_out) > 8 else "")
        notes.append(f"--outputs left out {len(left_out)} layer(s): {shown}")
    return replace(spec, inputs=inputs or dict(spec.inputs), layers=layers, notes=notes, outputs=wanted, left_out=left_out)
