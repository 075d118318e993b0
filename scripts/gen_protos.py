"""Generate the Python modules for protos/evalsvc/v1 (messages, .pyi, gRPC stubs and their .pyi).

One command, used by `make generate` and by the staleness test:

    python scripts/gen_protos.py [OUT_DIR]

OUT_DIR defaults to the repository root, so modules land in evalsvc/v1/ and import as `evalsvc.v1.*`.
Vendored google/* protos are not generated: googleapis-common-protos ships them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
VENDOR_ROOT = PROTO_ROOT / "vendor"
PACKAGE_DIR = Path("evalsvc") / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under out_dir/evalsvc/v1 and return their paths."""
    target = out_dir / PACKAGE_DIR
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    mypy_grpc = Path(sys.executable).parent / "protoc-gen-mypy_grpc"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{VENDOR_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (target / "__init__.py").write_text(
        '"""Generated from protos/evalsvc/v1 by scripts/gen_protos.py. Do not edit."""\n'
    )
    return sorted(p for p in target.rglob("*") if p.is_file())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
