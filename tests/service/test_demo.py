"""`lineinspect demo` end to end: a tiny training budget in a fresh LINEINSPECT_HOME, real server,
real stream client, real audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from lineinspect.service.demo import run_demo


def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEINSPECT_HOME", str(tmp_path / "home"))
    lines: list[str] = []
    result = run_demo(out=tmp_path / "out", frames=8, device="cpu", time_budget=12.0, fps=20.0,
                      progress=False, echo=lines.append)

    text = "\n".join(lines)
    assert "training the default tiny model" in text
    assert (tmp_path / "out" / "report.html").is_file()
    assert (tmp_path / "out" / "summary.json").is_file()
    s = result["stream"]
    assert s["captured"] == 8
    assert s["sent"] == s["captured"] - s["client_drops"]
    assert s["verdicts"] == s["sent"] - s["server_drops"] - s["lost_in_flight"]
    assert s["verdicts"] >= 1
    assert result["audit"]["counts"]["error"] == 0
    assert "report:" in text
