"""Regenerate ``caffe.desc`` (a serialized FileDescriptorSet) from ``caffe.proto``.

graft ships the descriptor rather than protoc-generated ``_pb2`` code so that any protobuf
runtime from 3.20 on can load it (generated code pins the runtime version). Needs grpcio-tools,
a development-only dependency: ``python -m convert.proto.build``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{HERE}", f"--descriptor_set_out={HERE / 'caffe.desc'}", str(HERE / "caffe.proto")])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    print(f"wrote {HERE / 'caffe.desc'}")


if __name__ == "__main__":
    main()
