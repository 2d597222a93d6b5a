"""The generated code in proto/ is what grpcio-tools makes of the .proto files today."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = REPO / "proto"


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    src = tmp_path / "proto"
    shutil.copytree(PROTO, src, ignore=shutil.ignore_patterns("*_pb2*.py*", "__pycache__"))
    protos = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", *protos],
        cwd=src, check=True,
    )
    generated = sorted(p.relative_to(src) for p in src.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(PROTO) for p in PROTO.rglob("*_pb2*.py*"))
    assert generated == committed, "generated file set differs: run `make proto`"
    for rel in generated:
        assert filecmp.cmp(src / rel, PROTO / rel, shallow=False), f"{rel} is stale: run `make proto`"


def test_wire_package_imports_under_namespace() -> None:
    from eptwatch.v1 import ingest_pb2, report_pb2

    assert report_pb2.DESCRIPTOR.package == "eptwatch.v1"
    assert ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name == "eptwatch.v1.Ingest"


def test_optional_counts_distinguish_unknown_from_zero() -> None:
    from eptwatch.v1 import report_pb2

    e = report_pb2.VmEstimate()
    assert not e.HasField("observed_huge_2m")
    e.observed_huge_2m = 0
    assert e.HasField("observed_huge_2m")
