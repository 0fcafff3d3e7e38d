"""`lineinspect audit`: verdicts for a folder or manifest of stored images, with a report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lineinspect.service.audit import AuditConfig


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "audit",
        help="audit stored images (folder or manifest) and write a report",
        description="Inspect every image of a folder (recursive) or manifest (one path per line). "
        "results.jsonl is written item by item; rerunning with the same --out resumes where it "
        "stopped. At the end: summary.json, results.csv and a self-contained report.html.",
    )
    p.add_argument("source", type=Path, metavar="DIR|MANIFEST.txt")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="HOST:PORT", help="send the images to a lineinspect server "
                       "(or replicas: IP:PORT,IP:PORT, balanced round-robin)")
    where.add_argument("--model", type=Path, metavar="MODEL_DIR", help="run this model locally")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR")
    p.add_argument("--concurrency", type=int, default=4,
                   help="items in flight to the server, or image-decoding threads with --model (default 4)")
    p.add_argument("--heatmaps", action="store_true", help="keep heatmaps and draw them in the report")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], with --model")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call, with --model")
    p.add_argument("--thumbnails", type=int, default=1000,
                   help="report rows with a picture, highest scores first (default 1000)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, default=None, help="client private key (PEM) for mutual TLS")
    p.add_argument("--give-up-after", type=float, default=120.0,
                   help="stop when the server is unreachable this many seconds (default 120; rerun resumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    from lineinspect.service.audit import AuditConfig

    return AuditConfig(
        source=args.source, out=args.out, server=args.server, model_dir=args.model,
        concurrency=args.concurrency, heatmaps=args.heatmaps, device=args.device, batch_size=args.batch_size,
        thumbnails=args.thumbnails, token_file=args.token_file, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, progress=not args.no_progress, give_up_after_s=args.give_up_after,
    )


def run(args: argparse.Namespace) -> int:
    from lineinspect.service.audit import run_audit

    summary = run_audit(config_from_args(args))
    c = summary["counts"]
    print(json.dumps({"items": summary["items"], **c, "report": str(args.out / "report.html")}))
    print(f"audit: {summary['items']} items, {c['defect']} defect, {c['good']} good, {c['error']} error; "
          f"report in {args.out}", file=sys.stderr)
    return 0
