"""The dependency runs one way: moe_lm/decoder.py imports fusion, fusion never imports moe_lm."""

from __future__ import annotations

import ast
from pathlib import Path

FUSION = Path(__file__).resolve().parents[2] / "fusion"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_fusion_does_not_import_moe_lm() -> None:
    files = sorted(FUSION.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        bad = {m for m in _imports(path) if "moe_lm" in m or m.startswith(("lineinspect.service", "grpc"))}
        assert not bad, f"{path.name} imports {bad}"
