"""`lineinspect ask`: a question (or a report) about one image, streamed to stdout; and
`lineinspect eval-language`: the language part's accuracy on held-out images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lineinspect.errors import LineInspectError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ask", help="ask about an image (inspection report by default), streaming the answer",
        description="Stream an inspection report, or the answer to QUESTION, for IMAGE: locally from a model "
        "directory with a language/ part (--model), or from a lineinspect server (--server).",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, metavar="MODEL_DIR", help="run the model directory locally")
    where.add_argument("--server", metavar="HOST:PORT", help="ask a lineinspect server (Describe)")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("question", nargs="?", default="", metavar="QUESTION",
                   help='e.g. "Where is the defect?" (default: the inspection report)')
    p.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (0 = default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], with --model")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA certificate (PEM) to verify a TLS server")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole answer, with --server")
    p.set_defaults(func=run_ask)

    e = sub.add_parser(
        "eval-language", help="measure the language part on held-out images",
        description="Ask every test image of --data for a report, its defect type, its location and whether it "
        "passes, in training and in held-out phrasings, and with the gates forced closed (ablation).",
    )
    e.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR")
    e.add_argument("--data", required=True, type=Path, help="data set whose test split to use (a synthetic set "
                   "written with a seed never trained on, or a real set)")
    e.add_argument("--max-images", type=int, default=None, help="evaluate a fixed random subset of this size")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-ablation", action="store_true", help="skip the gates-closed ablation")
    e.add_argument("--json", action="store_true", help="print one JSON object (default: a short summary)")
    e.set_defaults(func=run_eval)


def run_ask(args: argparse.Namespace) -> int:
    from lineinspect.images import read_image

    image = read_image(args.image)  # a clear error before any model loads
    pieces = _local(args, image) if args.model is not None else _remote(args)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _local(args: argparse.Namespace, image):
    from lineinspect.service.describe import DescribeConfig, answer_stream, image_evidence, load_for_serving
    from lineinspect.vision.model_io import load_inspector

    inspector = load_inspector(args.model, args.device)
    part = load_for_serving(args.model, inspector.model, args.device)
    limit = DescribeConfig().max_tokens_limit
    if not 0 <= args.max_tokens <= limit:
        raise LineInspectError(f"--max-tokens {args.max_tokens}: use 0 (default) to {limit}")
    evidence = image_evidence(inspector, part, image)
    return answer_stream(part, evidence, args.question, args.max_tokens or DescribeConfig().default_max_tokens,
                         args.temperature)


def _remote(args: argparse.Namespace):
    import grpc

    from lineinspect.service.stream_client import auth_metadata, open_channel, rpc_failure
    from lineinspect.v1 import inspection_pb2 as pb
    from lineinspect.v1 import inspection_pb2_grpc as pb_grpc

    channel = open_channel(args.server, args.tls_ca)
    stub = pb_grpc.InspectionServiceStub(channel)
    request = pb.DescribeRequest(image=pb.Image(encoded=args.image.read_bytes()), question=args.question,
                                 max_tokens=args.max_tokens, temperature=args.temperature)
    try:
        for chunk in stub.Describe(request, timeout=args.timeout, metadata=auth_metadata(args.token_file)):
            if chunk.text:
                yield chunk.text
    except grpc.RpcError as exc:
        raise rpc_failure(args.server, exc) from None
    finally:
        channel.close()


def run_eval(args: argparse.Namespace) -> int:
    from lineinspect.training.datasets import open_dataset
    from lineinspect.training.evaluate_language import evaluate_language

    result = evaluate_language(args.model, open_dataset(args.data), args.device, args.max_images,
                               ablation=not args.no_ablation)
    if args.json:
        print(json.dumps(result))
        return 0
    for split in ("train", "heldout", "gates_closed"):
        if split in result:
            r = result[split]
            print(f"{split:>12}: type {r['type_accuracy']}  location {r['location_accuracy']}  "
                  f"no-defect on good {r['good_no_defect']}  acceptable {r['acceptable_accuracy']}")
    print(f"chance (most common type): {result['chance_type_accuracy']}; {result['n_images']} images")
    return 0
