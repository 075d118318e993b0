"""The contract: buf lint and build pass offline, and the committed Python stubs match protos/."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_python_stubs_are_up_to_date(tmp_path: Path) -> None:
    generated = _load_generator().generate(tmp_path)
    committed_dir = ROOT / "evalsvc" / "v1"
    stale = [
        str(path.relative_to(tmp_path))
        for path in generated
        if not (committed_dir / path.name).exists() or not filecmp.cmp(path, committed_dir / path.name, shallow=False)
    ]
    extra = sorted(
        p.name for p in committed_dir.iterdir() if p.is_file() and not (tmp_path / "evalsvc" / "v1" / p.name).exists()
    )
    assert not stale and not extra, f"stale {stale}, extra {extra}: run `make generate`"


@pytest.mark.parametrize("command", [["lint"], ["build", "-o", "/dev/null"]])
def test_buf_passes(command: list[str]) -> None:
    buf = str(BUF) if BUF.exists() else shutil.which("buf")
    assert buf, "buf is missing: `make test` installs it with npm"
    done = subprocess.run([buf, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rpc_of_every_service_is_implemented() -> None:
    from evalsvc.api.datasets import DatasetGenerationServicer, DatasetServicer
    from evalsvc.api.eval_runs import EvalRunServicer
    from evalsvc.api.webhooks import WebhookServicer
    from evalsvc.v1 import dataset_generation_pb2, dataset_service_pb2, eval_run_service_pb2, webhook_service_pb2

    for servicer, module, name in [
        (EvalRunServicer, eval_run_service_pb2, "EvalRunService"),
        (DatasetServicer, dataset_service_pb2, "DatasetService"),
        (DatasetGenerationServicer, dataset_generation_pb2, "DatasetGenerationService"),
        (WebhookServicer, webhook_service_pb2, "WebhookService"),
    ]:
        for method in module.DESCRIPTOR.services_by_name[name].methods:
            assert method.name in vars(servicer), f"{name}.{method.name} is not implemented"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
