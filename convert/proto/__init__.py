"""Caffe's protobuf messages, built at import time from graft's own schema (``caffe.proto``).

Usage: ``from convert.proto import pb; net = pb.NetParameter()``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_DESC = Path(__file__).resolve().parent / "caffe.desc"


def _load() -> SimpleNamespace:
    fds = descriptor_pb2.FileDescriptorSet.FromString(_DESC.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    # GetMessageClass arrived in protobuf 4.22; MessageFactory.GetPrototype (removed in 5.x) before it
    make = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    ns = {}
    for fd in fds.file:
        for msg in fd.message_type:
            desc = pool.FindMessageTypeByName(f"{fd.package}.{msg.name}")
            ns[msg.name] = make(desc)
    return SimpleNamespace(**ns)


pb = _load()

__all__ = ["pb"]
