"""Batch audit: results store, resume after a crash, error rows, reports; local model and a real server."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineinspect.errors import LineInspectError
from lineinspect.service.audit import RESULTS_FILE, AuditConfig, ResultsStore, collect_items, run_audit
from lineinspect.service.audit_report import ranked

N_GOOD = 14


class Crash(Exception):
    pass


def make_images(folder: Path, n: int = N_GOOD, corrupt: bool = True) -> list[str]:
    """n small PNG/JPEG images (some in a sub-folder) plus one corrupt file; their item ids."""
    rng = np.random.default_rng(7)
    ids = []
    for i in range(n):
        rel = f"{'lot_b/' if i % 4 == 0 else ''}img_{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8)
        image[10:20, 10:30] = 255 * (i % 2)  # a bright patch on half of them
        assert cv2.imwrite(str(path), image)
        ids.append(rel)
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
        ids.append("broken.png")
    return sorted(ids)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]


def check_report(out: Path, ids: list[str]) -> dict:
    """Every item exactly once in results.jsonl, CSV and HTML; summary counts add up."""
    rows = read_rows(out)
    counts = Counter(r["item_id"] for r in rows)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}, counts
    summary = json.loads((out / "summary.json").read_text())
    c = summary["counts"]
    assert summary["items"] == len(ids) == c["good"] + c["defect"] + c["error"]
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["item_id"] for r in csv_rows) == sorted(ids)
    page = (out / "report.html").read_text()
    assert page.count('<tr class="row ') == len(ids)
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained
    assert "(score head, heatmap head)" in page  # what decides, from the server's model info
    return summary


@pytest.fixture(scope="module")
def inspector():
    from lineinspect.vision.model_io import untrained_inspector

    insp = untrained_inspector("tiny", num_classes=2)
    # Random weights score every image close to one value; put the threshold inside that
    # range so the report has both verdicts.
    rng = np.random.default_rng(7)
    scores = [r.score for r in insp.inspect_batch([rng.integers(0, 256, (48, 64, 3), np.uint8)
                                                  for _ in range(8)])]
    insp.calibration = replace(insp.calibration, threshold=float(np.median(scores)))
    return insp


# ---------------------------------------------------------------------------------------------
# Pieces without a model


def test_collect_items_folder_and_manifest(tmp_path: Path) -> None:
    ids = make_images(tmp_path / "imgs", n=5)
    items = collect_items(tmp_path / "imgs")
    assert [i.item_id for i in items] == sorted(ids)
    assert all(i.path.is_file() for i in items)

    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# lot 7\nimgs/img_01.png\n\n{tmp_path}/imgs/img_02.png\nimgs/img_01.png\nnope.png\n")
    items = collect_items(manifest)
    assert [i.item_id for i in items] == ["imgs/img_01.png", f"{tmp_path}/imgs/img_02.png", "nope.png"]
    assert items[0].path == tmp_path / "imgs/img_01.png"

    with pytest.raises(LineInspectError, match="no such folder"):
        collect_items(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LineInspectError, match="no images"):
        collect_items(tmp_path / "empty")


def test_results_store_cuts_torn_tail_and_refuses_garbled_middle(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    store = ResultsStore(path)
    store.append({"item_id": "a", "status": "ok"})
    store.append({"item_id": "b", "status": "ok"})
    store.close()
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"item_id": "c", "sta')  # crash in the middle of a write

    store = ResultsStore(path)
    assert set(store.load()) == {"a", "b"} and store.dropped_torn
    assert path.read_bytes() == intact  # the torn bytes are gone, appending is safe again
    store.append({"item_id": "c", "status": "ok"})
    store.close()
    assert set(ResultsStore(path).load()) == {"a", "b", "c"}

    path.write_bytes(intact + b"\x00\x00\x00\n")  # NUL padding after a power cut: also a torn tail
    assert set(ResultsStore(path).load()) == {"a", "b"}

    path.write_bytes(b'{"item_id": "a"}\ngarbage\n{"item_id": "b"}\n')
    with pytest.raises(LineInspectError, match="line 2"):
        ResultsStore(path).load()


def test_report_ranks_by_score_with_errors_last() -> None:
    rows = [{"item_id": "e", "status": "error"}, {"item_id": "x", "status": "ok", "score": 0.2},
            {"item_id": "y", "status": "ok", "score": 0.9}]
    assert [r["item_id"] for r in ranked(rows)] == ["y", "x", "e"]


# ---------------------------------------------------------------------------------------------
# Local model


def test_local_audit_crash_resume_and_torn_line(tmp_path: Path, inspector) -> None:
    ids = make_images(tmp_path / "imgs")
    out = tmp_path / "report"
    config = AuditConfig(tmp_path / "imgs", out, batch_size=4, concurrency=2, heatmaps=True, progress=False)

    seen: list[str] = []

    def crash_after_5(row: dict) -> None:
        seen.append(row["item_id"])
        if len(seen) == 5:
            raise Crash

    with pytest.raises(Crash):
        run_audit(config, inspector=inspector, on_result=crash_after_5)
    assert len(read_rows(out)) == 5  # what was recorded before the crash is on disk
    assert not (out / "summary.json").exists()

    again: list[str] = []
    summary = run_audit(config, inspector=inspector, on_result=lambda r: again.append(r["item_id"]))
    assert len(again) == len(ids) - 5 and not set(again) & set(seen)
    assert summary["resumed_items"] == 5
    summary = check_report(out, ids)
    c = summary["counts"]
    assert c["error"] == 1 and c["good"] > 0 and c["defect"] > 0
    rows = {r["item_id"]: r for r in read_rows(out)}
    assert rows["broken.png"]["status"] == "error" and "broken.png" in rows["broken.png"]["error"]
    assert all((out / r["heatmap"]).is_file() for r in rows.values() if r["status"] == "ok")
    assert summary["model"]["preset"] == "tiny" and summary["threshold"] == pytest.approx(
        inspector.threshold, abs=1e-4)
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64,") == len(ids) - 1  # a picture per readable image
    assert "only('defects')" in page

    # A crash mid-write of the last row: that item is cut off and done again, exactly once.
    data = (out / RESULTS_FILE).read_bytes()
    last = json.loads(data.splitlines()[-1])["item_id"]
    (out / RESULTS_FILE).write_bytes(data[: len(data) - 25])
    redone: list[str] = []
    run_audit(config, inspector=inspector, on_result=lambda r: redone.append(r["item_id"]))
    assert redone == [last]
    check_report(out, ids)


def test_audit_refuses_to_mix_sources(tmp_path: Path, inspector) -> None:
    make_images(tmp_path / "a", n=2, corrupt=False)
    make_images(tmp_path / "b", n=2, corrupt=False)
    out = tmp_path / "report"
    run_audit(AuditConfig(tmp_path / "a", out, progress=False), inspector=inspector)
    with pytest.raises(LineInspectError, match="another --out"):
        run_audit(AuditConfig(tmp_path / "b", out, progress=False), inspector=inspector)


def test_audit_cli_with_a_model_dir(tmp_path: Path, inspector, capsys) -> None:
    import argparse

    from lineinspect.service.commands import audit as audit_command
    from lineinspect.vision.model_io import save_model_dir

    ids = make_images(tmp_path / "imgs", n=5)
    model_dir = save_model_dir(tmp_path / "model", inspector.model, inspector.calibration)
    parser = argparse.ArgumentParser()
    audit_command.register(parser.add_subparsers())
    args = parser.parse_args(["audit", str(tmp_path / "imgs"), "--model", str(model_dir), "--out",
                              str(tmp_path / "report"), "--batch-size", "2", "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["items"] == len(ids) and printed["error"] == 1
    check_report(tmp_path / "report", ids)


# ---------------------------------------------------------------------------------------------
# Against a real server


class Restartable:
    """A real gRPC server on 127.0.0.1 (on the conftest's asyncio loop) that can be stopped and
    started again on the same port."""

    def __init__(self, aio_loop, inspector) -> None:
        self.aio_loop = aio_loop
        self.inspector = inspector
        self.running = None
        self.port = self.start()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> int:
        from lineinspect.service.config import ServerConfig
        from lineinspect.service.server import start_server

        config = ServerConfig(port=port, min_batch=1, max_batch=8, max_delay_ms=2.0, grace_s=0.0)
        self.running = self.aio_loop.run(start_server(config, self.inspector, warmup=False))
        return self.running.port

    def stop(self) -> None:
        if self.running is not None:
            self.aio_loop.run(self.running.stop(0.0))
            self.running = None


@pytest.fixture()
def audit_server(aio_loop, inspector) -> Iterator[Restartable]:
    """A server for this module's inspector (it has classes and a threshold inside the scores)."""
    running = Restartable(aio_loop, inspector)
    yield running
    running.stop()


def test_server_audit_with_errors_heatmaps_and_a_manifest(tmp_path: Path, audit_server: Restartable) -> None:
    server = audit_server
    ids = make_images(tmp_path / "imgs")
    manifest = tmp_path / "lot.txt"
    manifest.write_text("\n".join([f"imgs/{i}" for i in ids] + ["imgs/missing.png"]) + "\n")
    out = tmp_path / "report"
    config = AuditConfig(manifest, out, server=server.address, concurrency=3, heatmaps=True, progress=False)
    run_audit(config)
    expected = [f"imgs/{i}" for i in ids] + ["imgs/missing.png"]
    summary = check_report(out, expected)
    rows = {r["item_id"]: r for r in read_rows(out)}
    assert rows["imgs/broken.png"]["error_code"] == "INVALID_ARGUMENT"  # the server refused it
    assert rows["imgs/missing.png"]["error_code"] == "NOT_FOUND"  # never sent
    assert summary["counts"]["error"] == 2 and summary["counts"]["good"] + summary["counts"]["defect"] == N_GOOD
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["heatmap"] and (out / r["heatmap"]).is_file() for r in ok)
    assert all(r["image_size"][0] == 64 for r in ok)
    assert summary["model"]["preset"] == "tiny" and summary["score_percentiles"]["p50"] > 0


AUDIT_MAIN = (
    "import argparse, sys\n"
    "from lineinspect.service.commands import audit\n"
    "parser = argparse.ArgumentParser()\n"
    "audit.register(parser.add_subparsers())\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


def test_server_audit_killed_mid_run_then_resumed(tmp_path: Path, audit_server: Restartable) -> None:
    server = audit_server
    ids = make_images(tmp_path / "imgs", n=40, corrupt=False)
    out = tmp_path / "report"
    cmd = [sys.executable, "-c", AUDIT_MAIN, "audit", str(tmp_path / "imgs"), "--server", server.address,
           "--out", str(out), "--concurrency", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / RESULTS_FILE
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 4:
                os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no flush: a crash
                break
            time.sleep(0.005)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = len(ResultsStore(results).load())
    assert 4 <= before < len(ids)

    redone: list[str] = []
    config = AuditConfig(tmp_path / "imgs", out, server=server.address, progress=False)
    summary = run_audit(config, on_result=lambda r: redone.append(r["item_id"]))
    assert len(redone) == len(ids) - before
    assert summary["resumed_items"] == before
    check_report(out, ids)


def test_server_audit_survives_a_server_restart(tmp_path: Path, audit_server: Restartable) -> None:
    server = audit_server
    ids = make_images(tmp_path / "imgs", n=24, corrupt=False)
    out = tmp_path / "report"
    restarted = threading.Event()

    def restart() -> None:
        server.stop()
        time.sleep(0.3)
        server.start(server.port)
        restarted.set()

    rows: list[str] = []

    def after_each(row: dict) -> None:
        rows.append(row["item_id"])
        if len(rows) == 5:
            threading.Thread(target=restart).start()

    config = AuditConfig(tmp_path / "imgs", out, server=server.address, concurrency=2, progress=False)
    logs: list[str] = []
    summary = run_audit(config, on_result=after_each, log=logs.append)
    assert restarted.wait(30)
    assert any("reconnecting" in m for m in logs), "the audit stream must have broken and been reopened"
    assert sorted(rows) == sorted(ids)  # every item once, none lost in the broken stream
    assert summary["counts"]["error"] == 0
    check_report(out, ids)
