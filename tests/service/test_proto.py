"""The committed stubs match the proto, and the contract has the shape clients rely on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lineinspect.v1 import inspection_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("__init__.py", "inspection_pb2.py", "inspection_pb2.pyi", "inspection_pb2_grpc.py")


# Lines that only record which protoc / grpcio-tools made the file: a patch upgrade of the tools
# must not fail CI, a change of the contract must.
_TOOL_VERSION = re.compile(
    r"^(# Protobuf Python Version: .*|GRPC_GENERATED_VERSION = .*|\s+\d+,)$", re.MULTILINE
)


def _contract(text: str) -> str:
    return _TOOL_VERSION.sub("", text)


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, timeout=60)
    for name in GENERATED:
        fresh = (tmp_path / "lineinspect" / "v1" / name).read_text()
        committed = (REPO / "lineinspect" / "v1" / name).read_text()
        assert _contract(fresh) == _contract(committed), (
            f"lineinspect/v1/{name} is stale: run `python protos/generate.py` and commit the result"
        )


def test_stub_check_notices_a_contract_change(tmp_path: Path) -> None:
    committed = (REPO / "lineinspect" / "v1" / "inspection_pb2.py").read_text()
    assert _contract(committed.replace("want_heatmap", "want_heatmaps")) != _contract(committed)


def test_service_methods_and_streaming_kinds() -> None:
    service = pb.DESCRIPTOR.services_by_name["InspectionService"]
    assert service.full_name == "lineinspect.v1.InspectionService"
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert kinds == {
        "Inspect": (False, False),
        "InspectStream": (True, True),
        "Audit": (True, True),
        "Describe": (False, True),
        "GetModelInfo": (False, False),
    }


def _oneof(message: type, name: str) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.oneofs_by_name[name].fields}


def test_oneofs_and_enums() -> None:
    assert _oneof(pb.Image, "data") == {"encoded", "raw"}
    assert _oneof(pb.FrameResult, "outcome") == {"verdict", "dropped"}
    assert _oneof(pb.AuditResult, "outcome") == {"verdict", "error"}
    assert _oneof(pb.DescribeRequest, "source") == {"image", "frame"}
    reasons = set(pb.Drop.DropReason.keys())
    assert {"OVERLOADED", "INVALID_IMAGE", "TOO_LARGE", "DEADLINE_EXCEEDED", "SHUTTING_DOWN"} <= reasons
    assert {"UINT8", "UINT16"} <= set(pb.RawImage.PixelType.keys())
    frame = pb.Frame(camera_id="cam", frame_id=2**63)  # uint64 frame counters survive a round trip
    assert pb.Frame.FromString(frame.SerializeToString()).frame_id == 2**63
