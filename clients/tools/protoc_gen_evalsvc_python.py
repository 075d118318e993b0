"""buf local plugin: the Python client's generated modules (messages, .pyi, gRPC stubs and typed gRPC .pyi).

buf has no built-in grpc_python plugin, so this hands buf's CodeGeneratorRequest to grpcio-tools' protoc
(the generator version then equals the grpcio runtime) and to mypy-protobuf's protoc-gen-mypy_grpc, and moves
the output into the client package: `evalsvc/v1/x_pb2.py` -> `evalsvc_client/_gen/evalsvc/v1/x_pb2.py`, with
`from evalsvc.v1 import ...` rewritten to `from evalsvc_client._gen.evalsvc.v1 import ...` so the client never
imports the server package. google/* files are not generated: googleapis-common-protos ships them.

protoc reads the .proto sources under protos/ rather than buf's descriptors: buf's carry json_name and the
managed go_package, and the embedded descriptors must be byte-identical to the server's own stubs (evalsvc/v1),
or a process importing both (the in-process tests) fails with "duplicate file name".

Run it with the interpreter that has grpcio-tools and mypy-protobuf (the project's .venv).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "evalsvc_client/_gen/"
PACKAGE = "evalsvc_client._gen"
HEADER = '"""Generated from protos/ by `make generate-clients`. Do not edit."""\n'
_FROM = re.compile(r"^from evalsvc\.v1 import ", re.MULTILINE)
_IMPORT = re.compile(r"\bevalsvc\.v1\.(\w+_pb2)\b")


def _rewrite(text: str) -> str:
    text = _FROM.sub(f"from {PACKAGE}.evalsvc.v1 import ", text)
    return _IMPORT.sub(rf"{PACKAGE}.evalsvc.v1.\1", text)


def generate(request: plugin_pb2.CodeGeneratorRequest) -> plugin_pb2.CodeGeneratorResponse:
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    wanted = [name for name in request.file_to_generate if name.startswith("evalsvc/")]
    if not wanted:
        return response
    mypy_grpc = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        args = [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{ROOT / 'protos' / 'vendor'}",
            f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
            f"--mypy_grpc_out={out}",
            *wanted,
        ]
        if protoc.main(args) != 0:
            response.error = "grpc_tools.protoc failed"
            return response
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            rel = path.relative_to(out).as_posix()
            response.file.add(name=PREFIX + rel, content=_rewrite(path.read_text()))
    for package in ("", "evalsvc/", "evalsvc/v1/"):
        response.file.add(name=f"{PREFIX}{package}__init__.py", content=HEADER)
    return response


def main() -> None:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())


if __name__ == "__main__":
    main()
