"""Audit outputs from the result rows: ``summary.json``, ``results.csv`` and a self-contained
``report.html`` (inline CSS, base64 thumbnails, a few lines of inline JS; nothing external)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from lineinspect.errors import LineInspectError
from lineinspect.images import read_image
from lineinspect.vision.result import Box

CSV_COLUMNS = ("item_id", "path", "status", "verdict", "score", "threshold", "defect_class", "class_prob",
               "n_boxes", "boxes", "heatmap", "error")
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
THUMB_SIDE = 256


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def ranked(rows: Sequence[dict]) -> list[dict]:
    """Verdict rows by score, highest first, then error rows by item id."""
    ok = [r for r in rows if r.get("status") == "ok"]
    ok.sort(key=lambda r: (-float(r["score"]), r["item_id"]))
    bad = sorted((r for r in rows if r.get("status") != "ok"), key=lambda r: r["item_id"])
    return ok + bad


def build_summary(rows: Sequence[dict], info: dict, source: str, duration_s: float, resumed: int) -> dict:
    """Counts, per-class counts, score percentiles and the model behind them."""
    counts = Counter(r.get("verdict", "error") if r.get("status") == "ok" else "error" for r in rows)
    classes = Counter(r.get("defect_class") or "(none)" for r in rows
                      if r.get("status") == "ok" and r.get("verdict") == "defect")
    errors = Counter(r.get("error_code") or "UNKNOWN" for r in rows if r.get("status") != "ok")
    scores = np.asarray([float(r["score"]) for r in rows if r.get("status") == "ok"], dtype=np.float64)
    thresholds = sorted({round(float(r["threshold"]), 5) for r in rows if r.get("status") == "ok"})
    percentiles = ({f"p{q}": round(float(np.percentile(scores, q)), 5) for q in PERCENTILES}
                   | {"min": round(float(scores.min()), 5), "max": round(float(scores.max()), 5),
                      "mean": round(float(scores.mean()), 5)}) if scores.size else {}
    return {
        "source": source,
        "items": len(rows),
        "counts": {"good": counts.get("good", 0), "defect": counts.get("defect", 0),
                   "error": counts.get("error", 0)},
        "defect_classes": dict(sorted(classes.items())),
        "error_codes": dict(sorted(errors.items())),
        "score_percentiles": percentiles,
        "threshold": thresholds[0] if len(thresholds) == 1 else (thresholds or info.get("threshold")),
        "model": info,
        "duration_s": round(duration_s, 3),
        "resumed_items": resumed,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_csv(rows: Sequence[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        boxes = r.get("boxes") or []
        writer.writerow({**{k: r.get(k) for k in CSV_COLUMNS}, "n_boxes": len(boxes),
                         "boxes": json.dumps(boxes, separators=(",", ":")) if boxes else ""})
    _write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# HTML


def thumbnail_uri(row: dict, out: Path, side: int = THUMB_SIDE) -> str | None:
    """A JPEG data URI of the item's image with heatmap and boxes, or None when it cannot be read."""
    from lineinspect.service.overlay import render_overlay, thumbnail

    try:
        image = read_image(row["path"])
    except LineInspectError:
        return None
    small = thumbnail(image, side)
    scale = small.shape[1] / image.shape[1]
    heat = None
    if row.get("heatmap"):
        grey = cv2.imread(str(out / row["heatmap"]), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            heat = cv2.resize(grey, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA)
            heat = heat.astype(np.float32) / 255.0
    boxes = [Box(round(b["x0"] * scale), round(b["y0"] * scale), max(round(b["x1"] * scale), 1),
                 max(round(b["y1"] * scale), 1), float(b.get("score", 0.0)), b.get("label", ""))
             for b in row.get("boxes") or []]
    defect = row.get("verdict") == "defect"
    text = f"{'DEFECT' if defect else 'GOOD'} {float(row['score']):.3f}"
    picture = render_overlay(small, heat, boxes, text, defect=defect)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} table{border-collapse:collapse} td,th{padding:4px 8px;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top} .items img{max-width:256px;display:block}
tr.defect td.v{color:#b00;font-weight:bold} tr.good td.v{color:#070} tr.error td.v{color:#850}
body.only-defects tr.row:not(.defect){display:none} body.only-errors tr.row:not(.error){display:none}
.meta{color:#555} .err{color:#850;max-width:40em;word-break:break-word} .cnt td{border:none}
"""

_JS = """
function only(kind){document.body.className=kind?'only-'+kind:'';return false;}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _sources(model: dict) -> str:
    """What decides the verdicts and draws the heatmaps, where the server says (servers before it did not)."""
    if not model.get("score_source"):
        return ""
    return f" (score {_e(model['score_source'])}, heatmap {_e(model.get('map_source') or 'head')})"


def render_html(rows: Sequence[dict], summary: dict, thumbs: dict[str, str]) -> str:
    """The report page; `rows` already in display order, `thumbs` maps item_id to a data URI."""
    c = summary["counts"]
    model = summary.get("model") or {}
    head = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lineinspect audit: {_e(summary['source'])}</title>",
        f"<style>{_CSS}</style><script>{_JS}</script></head><body>",
        f"<h1>Audit of {_e(summary['source'])}</h1>",
        f"<p class=meta>{summary['items']} items: <b>{c['defect']}</b> defect, {c['good']} good, "
        f"{c['error']} error &middot; threshold {_e(summary['threshold'])} &middot; model "
        f"{_e(model.get('preset'))} {_e(model.get('version'))}{_sources(model)} &middot; {summary['duration_s']} s</p>",
    ]
    if summary["defect_classes"]:
        head.append("<table class=cnt><tr><th>defect class</th><th>count</th></tr>")
        head += [f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in summary["defect_classes"].items()]
        head.append("</table>")
    head.append(
        '<p>Show: <a href="#" onclick="return only(\'\')">all</a> | '
        '<a href="#" onclick="return only(\'defects\')">defects only</a> | '
        '<a href="#" onclick="return only(\'errors\')">errors only</a></p>'
    )
    body = ['<table class=items><thead><tr><th>#</th><th>image</th><th>item</th><th>verdict</th>'
            '<th>score</th><th>class</th><th>boxes</th></tr></thead><tbody>']
    for rank, r in enumerate(rows, 1):
        kind = r.get("verdict") if r.get("status") == "ok" else "error"
        uri = thumbs.get(r["item_id"])
        img = f'<img src="{uri}" alt="{_e(r["item_id"])}" loading="lazy">' if uri else ""
        if kind == "error":
            cells = f'<td class=v>error</td><td colspan=3 class=err>{_e(r.get("error"))}</td>'
        else:
            cls = r.get("defect_class") or ""
            prob = f" ({float(r['class_prob']):.2f})" if cls else ""
            cells = (f"<td class=v>{_e(kind)}</td><td>{float(r['score']):.4f}</td>"
                     f"<td>{_e(cls)}{prob}</td><td>{len(r.get('boxes') or [])}</td>")
        body.append(f'<tr class="row {_e(kind)}" id="r{rank}"><td>{rank}</td><td>{img}</td>'
                    f"<td>{_e(r['item_id'])}</td>{cells}</tr>")
    body.append("</tbody></table></body></html>")
    return "\n".join(head + body) + "\n"


def write_reports(out: Path, rows: Sequence[dict], info: dict, source: str, duration_s: float,
                  resumed: int = 0, thumbnails: int = 1000, workers: int = 2) -> dict:
    """Write summary.json, results.csv and report.html into `out`; return the summary."""
    out = Path(out)
    summary = build_summary(rows, info, source, duration_s, resumed)
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    order = ranked(rows)
    write_csv(order, out / "results.csv")
    pictured = [r for r in order if r.get("status") == "ok"][:thumbnails]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        uris = list(pool.map(lambda r: thumbnail_uri(r, out), pictured))
    thumbs = {r["item_id"]: u for r, u in zip(pictured, uris, strict=True) if u}
    _write_text(out / "report.html", render_html(order, summary, thumbs))
    return summary
