"""`lineinspect demo` end to end: a tiny training budget in a fresh LINEINSPECT_HOME, real server,
real stream client, real audit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lineinspect.errors import LineInspectError
from lineinspect.service.demo import run_demo


def test_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEINSPECT_HOME", str(tmp_path / "home"))
    lines: list[str] = []
    streamed: list[str] = []
    result = run_demo(out=tmp_path / "out", frames=8, device="cpu", time_budget=12.0, language_budget=12.0,
                      fps=20.0, progress=False, echo=lines.append, write=streamed.append)

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
    # The worst frame's written report arrived in pieces, as it was generated, and nothing was lost.
    written = result["written_report"]
    assert written["tokens"] >= 1 and written["finish_reason"] in ("stop", "length")
    # (A decoder trained 12 s may write an empty report; whatever it wrote must have streamed.)
    assert written["text"] in "".join(streamed)
    # A second demo after the cached model changed redoes its report instead of refusing to mix models.
    from lineinspect.service import defaults

    shutil.rmtree(defaults.default_model_dir())
    again = run_demo(out=tmp_path / "out", frames=4, device="cpu", time_budget=12.0, language_budget=12.0,
                     fps=20.0, progress=False, echo=lines.append, write=streamed.append)
    assert again["audit"]["counts"]["error"] == 0 and (tmp_path / "out" / "report.html").is_file()


def test_demo_refuses_to_clear_a_folder_that_is_not_its_report(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(LineInspectError, match="not an earlier lineinspect report"):
        run_demo(out=tmp_path, frames=1, device="cpu", progress=False, echo=lambda _: None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
