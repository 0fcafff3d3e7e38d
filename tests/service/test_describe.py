"""Describe over a real server on 127.0.0.1: streamed chunks, FrameRef reuse without re-encoding,
step-level batching of concurrent requests, the fast path answering while text is generated,
bad requests, a server without a language part, and the `ask` CLI both ways.

The models have random weights (a contract test needs shapes and plumbing, not accuracy; the
trained path is tested in tests/training). The report model's gates are opened so the image
matters, and its <eos> output row is zeroed so greedy answers run to max_tokens.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from lineinspect.moe_lm.report_model import LanguagePart, ReportModel, language_config, save_language
from lineinspect.moe_lm.tokenizer import train_tokenizer
from lineinspect.service.cli import main
from lineinspect.service.config import ServerConfig
from lineinspect.service.describe import DescribeConfig, answer_stream, image_evidence
from lineinspect.service.server import start_server
from lineinspect.training import captions as cap
from lineinspect.training.train_language import evidence_config_for
from lineinspect.v1 import inspection_pb2 as pb
from lineinspect.vision.model_io import save_model_dir, untrained_inspector

Code = grpc.StatusCode


def _language(inspector) -> LanguagePart:
    labels = [cap.DefectLabel(t, ("center",), 1, "small", "low") for t in cap.DEFECT_TYPES] + [cap.GOOD_LABEL]
    tokenizer = train_tokenizer(list(cap.corpus(labels)) * 4, 400)
    torch.manual_seed(0)
    # untied head: a random tied model mostly repeats its input token
    config = language_config("tiny", tokenizer.vocab_size, evidence_config_for(inspector.model),
                             tie_embeddings=False)
    model = ReportModel(config)
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.xattn.gate_scale.fill_(2.0)
        model.decoder.lm_head.weight[tokenizer.eos_id] = 0.0  # the eos logit is 0, never the max
    part = LanguagePart(model.eval(), tokenizer, {})
    # standardise the evidence as training does, so that every feature reaches the random decoder
    rng = np.random.default_rng(0)
    sample = [image_evidence(inspector, part, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    model.fit_evidence_scale(torch.stack(sample))
    return part


@pytest.fixture(scope="module")
def inspector():
    inspector = untrained_inspector("tiny", seed=1)
    inspector.inspect_batch([np.zeros((32, 32, 3), np.uint8)])
    return inspector


@pytest.fixture(scope="module")
def language(inspector) -> LanguagePart:
    return _language(inspector)


@pytest.fixture(scope="module")
def lang_server(aio_loop, inspector, language):
    config = ServerConfig(port=0, grace_s=1.0, min_batch=1, max_delay_ms=2.0)
    running = aio_loop.run(start_server(config, inspector, warmup=False, language=language,
                                        describe_config=DescribeConfig(max_batch=8, frame_cache_mb=1.0)))
    yield running
    aio_loop.run(running.stop(0.5))


@pytest.fixture()
def encoder_calls(inspector):
    calls = []
    # a hook on the defect model: the Inspector calls its hooks on every path, copies and graphs included
    handle = inspector.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    yield calls
    handle.remove()


def _text(chunks: list[pb.TextChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_describe_streams_chunks_that_match_local_generation(lang_server, connect, media, inspector, language) -> None:
    stub = connect.stub(lang_server.port)
    image = media.sample(seed=3)
    chunks = list(stub.Describe(pb.DescribeRequest(image=pb.Image(encoded=media.png(image)), max_tokens=20),
                                timeout=30))
    assert len(chunks) >= 5 and all(not c.done for c in chunks[:-1])
    last = chunks[-1]
    assert last.done and last.finish_reason == "length" and last.tokens == 20
    assert [c.tokens for c in chunks] == sorted(c.tokens for c in chunks)
    local = "".join(answer_stream(language, image_evidence(inspector, language, image), "", 20))
    assert _text(chunks) == local and local.strip()


def test_frame_ref_reuses_stream_tokens_without_encoding(lang_server, connect, media, encoder_calls) -> None:
    stub = connect.stub(lang_server.port)
    images = [media.sample(seed=10 + i) for i in range(3)]
    images[2] = 255 - images[2]  # a clearly different frame
    images[2][10:30, 20:40] = 0
    frames = [pb.Frame(camera_id="line-3", frame_id=100 + i, image=pb.Image(encoded=media.png(im)))
              for i, im in enumerate(images)]
    results = list(stub.InspectStream(iter(frames), timeout=30))
    assert all(r.HasField("verdict") for r in results)
    encoded = len(encoder_calls)
    question = "Where is the defect?"
    by_ref = list(stub.Describe(pb.DescribeRequest(frame=pb.FrameRef(camera_id="line-3", frame_id=101),
                                                   question=question, max_tokens=12), timeout=30))
    assert len(encoder_calls) == encoded, "a FrameRef must not run the encoder again"
    assert by_ref[-1].done and _text(by_ref)
    by_image = list(stub.Describe(pb.DescribeRequest(image=pb.Image(encoded=media.png(images[1])),
                                                     question=question, max_tokens=12), timeout=30))
    assert len(encoder_calls) == encoded + 1  # an Image is encoded once, through the fast batcher
    assert _text(by_image) == _text(by_ref)
    other = list(stub.Describe(pb.DescribeRequest(frame=pb.FrameRef(camera_id="line-3", frame_id=102),
                                                  question=question, max_tokens=12), timeout=30))
    assert _text(other) != _text(by_ref)  # the answer depends on the frame
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Describe(pb.DescribeRequest(frame=pb.FrameRef(camera_id="line-3", frame_id=999)), timeout=30))
    assert err.value.code() == Code.NOT_FOUND and "line-3" in err.value.details()


def test_concurrent_requests_are_batched_and_answer_as_alone(lang_server, connect, media) -> None:
    stub = connect.stub(lang_server.port)
    requests = [pb.DescribeRequest(image=pb.Image(encoded=media.png(media.sample(seed=20 + i))),
                                   question=q, max_tokens=24)
                for i, q in enumerate(["", "What defect is visible?", "Is this part acceptable?", ""])]
    alone = [_text(list(stub.Describe(r, timeout=30))) for r in requests]
    stats = lang_server.describer.stats
    together: list[str | None] = [None] * len(requests)

    def ask(i: int) -> None:
        together[i] = _text(list(stub.Describe(requests[i], timeout=60)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert stats["max_rows"] >= 2, stats  # decoded in one batch at least for some steps


def test_fast_path_keeps_answering_while_describe_runs(lang_server, connect, media) -> None:
    stub = connect.stub(lang_server.port)
    chunk_times: list[float] = []
    chunks = []

    def long_describe() -> None:
        request = pb.DescribeRequest(image=pb.Image(encoded=media.png(media.sample(seed=5))), max_tokens=200)
        for chunk in stub.Describe(request, timeout=120):
            chunk_times.append(time.perf_counter())
            chunks.append(chunk)

    thread = threading.Thread(target=long_describe)
    thread.start()
    while not chunk_times and thread.is_alive():
        time.sleep(0.001)
    latencies, during = [], 0
    image = media.image(seed=6)
    for i in range(300):
        t0 = time.perf_counter()
        reply = stub.Inspect(pb.InspectRequest(request_id=str(i), image=image), timeout=10)
        latencies.append(time.perf_counter() - t0)
        assert reply.request_id == str(i)
        if thread.is_alive():
            during += 1
        elif i >= 20:
            break
    thread.join(120)
    # the answer streamed to its end: 200 tokens in many chunks (tokens that end inside a UTF-8
    # character wait for the next one)
    assert chunks[-1].done and chunks[-1].tokens == 200 and len(chunks) >= 40
    assert during >= 5, "Inspect calls must complete while Describe is generating"
    assert max(latencies) < 2.0 and float(np.median(latencies)) < 0.5, (max(latencies), np.median(latencies))
    assert lang_server.describer.stats["yield_waits"] >= 1  # the decode thread gave way to the fast path


def test_bad_describe_requests(lang_server, connect, media) -> None:
    stub = connect.stub(lang_server.port)
    image = media.image()
    for request, word in [
        (pb.DescribeRequest(image=image, temperature=-1.0), "temperature"),
        (pb.DescribeRequest(image=image, max_tokens=100000), "max_tokens"),
        (pb.DescribeRequest(image=image, question="x" * 2000), "question"),
        (pb.DescribeRequest(image=pb.Image(encoded=b"not an image")), "image"),
        (pb.DescribeRequest(), "image"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Describe(request, timeout=30))
        assert err.value.code() == Code.INVALID_ARGUMENT and word in err.value.details(), err.value.details()
    sampled = list(stub.Describe(pb.DescribeRequest(image=image, temperature=1.0, max_tokens=8), timeout=30))
    assert sampled[-1].done and sampled[-1].tokens == 8


def test_without_a_language_part_describe_is_unimplemented(server_factory, connect, media) -> None:
    plain = server_factory()
    with pytest.raises(grpc.RpcError) as err:
        list(connect.stub(plain.port).Describe(pb.DescribeRequest(image=media.image()), timeout=10))
    assert err.value.code() == Code.UNIMPLEMENTED and "language/" in err.value.details()


def test_ask_cli_local_and_server(tmp_path: Path, lang_server, inspector, language, media, capsys) -> None:
    model_dir = tmp_path / "model"
    save_model_dir(model_dir, inspector.model, inspector.calibration)
    save_language(model_dir, language.model, language.tokenizer)
    image = tmp_path / "part.png"
    image.write_bytes(media.png(media.sample(seed=8)))
    assert main(["ask", "--model", str(model_dir), str(image), "Where is the defect?", "--max-tokens", "16"]) == 0
    local = capsys.readouterr().out.strip()
    assert main(["ask", "--server", f"127.0.0.1:{lang_server.port}", str(image), "Where is the defect?",
                 "--max-tokens", "16"]) == 0
    remote = capsys.readouterr().out.strip()
    assert local and local == remote
    assert main(["ask", "--model", str(tmp_path), str(image)]) == 2  # no model there: one clear error
