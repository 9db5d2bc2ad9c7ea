"""Fields a prototxt sets that graft's ``caffe.proto`` does not know, so that none vanishes unseen.

``text_format.Parse(..., allow_unknown_field=True)`` accepts a fork's fields and throws them
away. A fork field that changes numerics (a rounding flag, a whole new ``*_param``) would then
be ignored without a word. This module walks the same text with protobuf's public tokenizer
against the message descriptors and lists every field the schema lacks, with the layer it sits
in. Values of unknown fields (scalars, lists, nested messages in ``f { }``, ``f: { }`` or
``f < >`` form) are skipped token by token, so what follows them is still checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format

#: messages that open a layer context (their ``name`` and ``type`` label the findings)
LAYER_MESSAGES = ("LayerParameter", "V1LayerParameter")


@dataclass
class LayerRef:
    """The layer a finding sits in: filled in while its body is read (name may follow the field)."""

    index: int
    name: str = ""
    type: str = ""


@dataclass(frozen=True)
class UnknownField:
    path: str  # dotted, from the layer (or from the top message outside layers): 'pooling_param.foo'
    layer: LayerRef | None = field(compare=False)
    is_message: bool  # the value was a message ({...}); its contents are not listed


class _Walker:
    def __init__(self, text: str):
        self.tok = text_format.Tokenizer(text.splitlines())
        self.found: list[UnknownField] = []
        self.layers = 0

    # -- known messages: check every field name against the descriptor
    def message(self, desc: Any, prefix: str, layer: LayerRef | None, close: str | None) -> None:
        tok = self.tok
        while not (tok.AtEnd() if close is None else tok.TryConsume(close)):
            name = self.field_name()
            fd = desc.fields_by_name.get(name)
            if fd is None:
                is_msg = self.skip_value()
                self.found.append(UnknownField(prefix + name, layer, is_msg))
            elif fd.message_type is not None:
                self.message_value(fd.message_type, f"{prefix}{name}.", layer)
            elif layer is not None and not prefix and name in ("name", "type"):
                tok.TryConsume(":")
                setattr(layer, name, self.scalar_text())
            else:
                self.skip_value()
            tok.TryConsume(",") or tok.TryConsume(";")

    def message_value(self, desc: Any, prefix: str, layer: LayerRef | None) -> None:
        tok = self.tok
        tok.TryConsume(":")
        if tok.TryConsume("["):  # f: [ {...}, {...} ]
            while not tok.TryConsume("]"):
                self.one_message(desc, prefix, layer)
                tok.TryConsume(",")
            return
        self.one_message(desc, prefix, layer)

    def one_message(self, desc: Any, prefix: str, layer: LayerRef | None) -> None:
        close = self.open()
        if desc.name in LAYER_MESSAGES:
            self.layers += 1
            self.message(desc, "", LayerRef(self.layers - 1), close)
        else:
            self.message(desc, prefix, layer, close)

    # -- unknown fields: skip the value, whatever its form
    def skip_value(self) -> bool:
        """Skip one field's value; True when it was a message."""
        tok = self.tok
        if not tok.TryConsume(":"):
            self.skip_message()  # f { ... } / f < ... >
            return True
        if tok.token in ("{", "<"):
            self.skip_message()
            return True
        if tok.TryConsume("["):
            is_msg = False
            while not tok.TryConsume("]"):
                if tok.token in ("{", "<"):
                    self.skip_message()
                    is_msg = True
                else:
                    self.scalar_text()
                tok.TryConsume(",")
            return is_msg
        self.scalar_text()
        return False

    def skip_message(self) -> None:
        close = self.open()
        tok = self.tok
        while not tok.TryConsume(close):
            self.field_name()
            self.skip_value()
            tok.TryConsume(",") or tok.TryConsume(";")

    # -- tokens
    def open(self) -> str:
        if self.tok.TryConsume("{"):
            return "}"
        self.tok.Consume("<")
        return ">"

    def field_name(self) -> str:
        tok = self.tok
        if tok.TryConsume("["):  # [extension.name] or [type.googleapis.com/...]
            parts = []
            while not tok.TryConsume("]"):
                if tok.AtEnd():
                    raise text_format.ParseError("unexpected end of text")
                parts.append(tok.token)
                tok.NextToken()
            return "[" + "".join(parts) + "]"
        return tok.ConsumeIdentifier()

    def scalar_text(self) -> str:
        """One scalar value as written (adjacent string literals joined, quotes removed)."""
        tok = self.tok
        if tok.AtEnd():
            raise text_format.ParseError("unexpected end of text")
        if tok.token[:1] in ("'", '"'):
            return tok.ConsumeString()
        sign = ""
        if tok.token == "-":  # '- 1' tokenizes as two tokens
            sign = "-"
            tok.NextToken()
        value = sign + tok.token
        tok.NextToken()
        return value


def unknown_fields(text: str, descriptor: Any) -> list[UnknownField]:
    """Every field of ``text`` that ``descriptor`` (e.g. ``NetParameter.DESCRIPTOR``) does not know.

    Meant for text that ``text_format.Parse`` already accepted; should the walk still fail, the
    findings up to that point are returned.
    """
    walker = _Walker(text)
    try:
        walker.message(descriptor, "", None, None)
    except text_format.ParseError:
        pass
    return walker.found


def notes(found: list[UnknownField], type_names: dict[str, str] | None = None,
          skip_types: set[str] | frozenset[str] = frozenset(), most_named: int = 3) -> list[str]:
    """One line per unknown field: ``layer 'pool1' (Pooling): unknown field 'pooling_param.foo' ignored``.

    A field is reported once per layer; layers of one type that share it are named on one line
    (the first ``most_named``, then a count), so a fork flag on every convolution stays one line.
    An unknown ``*_param`` message directly in a layer is named once, not field by field.
    ``type_names`` maps V1 enum names to V2 type strings; layers of ``skip_types`` (dropped
    from a deploy net anyway) are not reported.
    """
    type_names = type_names or {}
    groups: dict[tuple[str, str, bool], list[LayerRef | None]] = {}
    for f in found:
        ltype = type_names.get(f.layer.type, f.layer.type) if f.layer else ""
        if ltype in skip_types:
            continue
        whole = f.layer is not None and f.is_message and "." not in f.path and f.path.endswith("_param")
        refs = groups.setdefault((ltype, f.path, whole), [])
        if f.layer is None or all(r is not f.layer for r in refs):
            refs.append(f.layer)
    lines = []
    for (ltype, path, whole), refs in groups.items():
        what = f"unknown parameter message '{path}' ignored" if whole else f"unknown field '{path}' ignored"
        if refs[0] is None:
            lines.append(what)
            continue
        names = [f"'{r.name}'" if r.name else f"#{r.index + 1}" for r in refs]
        shown = ", ".join(names[:most_named]) + (f" and {len(names) - most_named} more" if len(names) > most_named else "")
        lines.append(f"{'layer' if len(names) == 1 else 'layers'} {shown} ({ltype or 'no type'}): {what}")
    return lines
