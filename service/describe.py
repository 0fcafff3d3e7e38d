"""The language path for serving: Describe requests decoded together, step by step, on one thread.

Continuous batching. Each step of the decode thread (1) admits every waiting request that fits:
their prompts are prefilled together (left-padded) and their KV caches merged into the running
batch, (2) picks one token per running sequence (greedy or per-request temperature) and sends
each sequence's new text to its request, (3) drops finished or cancelled sequences, and (4)
runs one decoder step for the rest. A request therefore joins at the next step instead of
waiting for the batch in flight, and leaves as soon as it is done.

The fast path keeps priority: before every step the thread waits while the fast batcher has
FAST or BULK work queued or a batch running, so a camera frame waits for at most one decoder
step (milliseconds for the tiny decoder), never for a whole answer.

Evidence tokens. ``EvidenceTap`` turns the defect model's output inside the fast batch worker
into the language path's evidence tokens: a forward hook on the defect model hands its output
to the calling thread's capture list, which exists only while the engine runs a batch that asked
for tokens (the hook keeps no state of its own). Frames of camera streams are stored in
``FrameTokenCache`` keyed by (camera_id, frame_id), an LRU bounded in bytes (float16 tokens), so
a later ``Describe(frame=FrameRef)`` reuses them without encoding the image again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.generate import SamplingConfig, left_pad, stream
from lineinspect.moe_lm.kv_cache import KVCache
from lineinspect.moe_lm.report_model import (
    EvidenceConfig,
    LanguagePart,
    evidence_tokens,
    file_digest,
    load_language,
    prompt_text,
)
from lineinspect.service.batcher import Overloaded, ShuttingDown
from lineinspect.vision.cpu_threads import start_single_threaded
from lineinspect.vision.inspector import Calibration, calibrated_score

log = logging.getLogger(__name__)

FrameKey = tuple[str, int]


@dataclass(frozen=True)
class DescribeConfig:
    max_batch: int = 16  # sequences decoded together
    default_max_tokens: int = 96  # when a request says 0
    max_tokens_limit: int = 256  # larger requests are refused (INVALID_ARGUMENT)
    max_temperature: float = 2.0
    max_question_chars: int = 500
    queue_size: int = 64  # requests waiting to join the batch; more -> RESOURCE_EXHAUSTED
    frame_cache_mb: float = 256.0  # evidence tokens of recent stream frames

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.default_max_tokens < 1:
            raise LineInspectError("describe config: max_batch, queue_size and default_max_tokens must be >= 1")
        if self.max_tokens_limit < self.default_max_tokens:
            raise LineInspectError("describe config: max_tokens_limit must be >= default_max_tokens")
        if self.frame_cache_mb < 0:
            raise LineInspectError("describe config: frame_cache_mb must be >= 0")


class FrameNotCached(LineInspectError):
    """A FrameRef names a frame whose tokens are not (or no longer) in the cache."""


class Chunk(NamedTuple):
    text: str  # new text since the previous chunk
    done: bool
    tokens: int  # tokens generated so far
    finish_reason: str  # "stop" / "length" on the last chunk, else ""


# --------------------------------------------------------------------------- evidence from the fast path


class FrameTokenCache:
    """LRU of evidence tokens (N, D) per (camera_id, frame_id), bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[FrameKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: FrameKey, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = tokens
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def get(self, key: FrameKey) -> torch.Tensor | None:
        with self._lock:
            tokens = self._items.get(key)
            if tokens is not None:
                self._items.move_to_end(key)
            return tokens

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes


class EvidenceTap:
    """Evidence tokens from the fast path's own defect-model call (see the module docstring)."""

    def __init__(self, model: nn.Module, config: EvidenceConfig,
                 calibration: Callable[[], Calibration] | None = None) -> None:
        """`calibration` returns the fast path's current calibration (the decision features need
        it; it may change while serving)."""
        if config.decision and calibration is None:
            raise LineInspectError("evidence tap: this language part reads the fast path's decision; "
                                   "pass its calibration")
        self.config = config
        self._calibration = calibration
        self._local = threading.local()
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        sink = getattr(self._local, "sink", None)
        if sink is not None:
            sink.append((args[0], output))  # (the model's input images, its DefectOutput)

    @contextmanager
    def capture(self) -> Iterator[list]:
        """Collect the defect model's outputs of calls made by this thread inside the block."""
        self._local.sink = []
        try:
            yield self._local.sink
        finally:
            self._local.sink = None

    def tokens(self, outputs: list) -> torch.Tensor | None:
        """The one captured DefectOutput -> evidence tokens (B, N, D) float16, or None."""
        if len(outputs) != 1:
            return None
        images, out = outputs[0]
        with torch.inference_mode():
            decision = None
            if self.config.decision:
                cal = self._calibration()
                decision = (calibrated_score(out, cal), cal.threshold)
            ev = evidence_tokens(out.patches, out.anomaly_map, out.image_prob, out.class_logits, self.config, images,
                                 decision)
            return ev.to(torch.float16)

    def close(self) -> None:
        self._handle.remove()


def load_for_serving(model_dir: str | Path, defect_model: nn.Module, device: str | torch.device = "cpu"
                     ) -> LanguagePart:
    """The language part of `model_dir`, checked against the defect model being served."""
    part = load_language(model_dir, device)
    digest = part.meta.get("defect_model_sha256")
    weights = Path(model_dir) / "model.safetensors"
    if digest and weights.is_file() and digest != file_digest(weights):
        raise LineInspectError(
            f"{model_dir}: its language part was trained on other defect-model weights; retrain it with "
            f"`lineinspect train --data DATA --out {model_dir} --stages 1,2,3`"
        )
    enc, head = defect_model.config.encoder, defect_model.config.head
    expected = part.model.config.evidence
    if (enc.embed_dim, enc.grid, head.num_classes) != (expected.patch_dim, expected.grid, expected.n_classes):
        raise LineInspectError(
            f"{model_dir}: the language part expects encoder width {expected.patch_dim}, a {expected.grid}x"
            f"{expected.grid} patch grid and {expected.n_classes} classes; the defect model has {enc.embed_dim}, "
            f"{enc.grid}x{enc.grid}, {head.num_classes}; retrain the language stages"
        )
    return part


# --------------------------------------------------------------------------- decode-batch bookkeeping


def _trim(cache: KVCache) -> tuple[int, int]:
    """(first, length): the first slot any row uses, and how many slots from there are filled."""
    used = cache.key_mask[:, : cache.length].any(dim=0)
    first = int(used.float().argmax()) if bool(used.any()) else cache.length
    return first, cache.length - first


def merge_caches(parts: Sequence[KVCache], room: int) -> KVCache:
    """Stack the rows of several caches into one, each right-aligned to the longest (so it looks
    left-padded), with `room` free slots after it. Slots no row uses are dropped first."""
    spans = [_trim(c) for c in parts]
    length = max(n for _, n in spans)
    ref = parts[0]
    depth = len(ref.keys)
    B = sum(c.batch for c in parts)
    _, H, _, hd = ref.keys[0].shape
    cap = length + room
    new = KVCache(
        keys=[ref.keys[0].new_zeros(B, H, cap, hd) for _ in range(depth)],
        values=[ref.values[0].new_zeros(B, H, cap, hd) for _ in range(depth)],
        key_mask=torch.zeros(B, cap, dtype=torch.bool, device=ref.key_mask.device),
        n_real=torch.cat([c.n_real for c in parts]),
        length=length,
        cross_kv={b: tuple(torch.cat([c.cross_kv[b][j] for c in parts]) for j in range(2))
                  for b in ref.cross_kv},
    )
    row = 0
    for c, (first, n) in zip(parts, spans):
        rows, dst = slice(row, row + c.batch), slice(length - n, length)
        src = slice(first, first + n)
        for layer in range(depth):
            new.keys[layer][rows, :, dst] = c.keys[layer][:, :, src]
            new.values[layer][rows, :, dst] = c.values[layer][:, :, src]
        new.key_mask[rows, dst] = c.key_mask[:, src]
        row += c.batch
    return new


def select_rows(cache: KVCache, keep: torch.Tensor) -> KVCache:
    """The cache of the rows `keep` (long indices), same slots."""
    return KVCache(
        keys=[k[keep] for k in cache.keys], values=[v[keep] for v in cache.values],
        key_mask=cache.key_mask[keep], n_real=cache.n_real[keep], length=cache.length,
        cross_kv={b: (kv[0][keep], kv[1][keep]) for b, kv in cache.cross_kv.items()},
    )


class TextDelta:
    """Incremental detokenisation: the new text of a growing token list (holds back a partial
    UTF-8 character until it is complete)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.sent = ""

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        text = self.tokenizer.decode(list(ids)).lstrip()  # answers start with the space after "answer:"
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):  # a merge changed earlier bytes: resend nothing twice
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    evidence: torch.Tensor  # (N, D)
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    delta: TextDelta
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False

    def send(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


# --------------------------------------------------------------------------- engine


class DescribeEngine:
    """Owns the report model, its decode thread and the frame-token cache."""

    def __init__(self, part: LanguagePart, config: DescribeConfig | None = None,
                 device: str | torch.device = "cpu", fast_busy: Callable[[], bool] = lambda: False) -> None:
        self.config = config or DescribeConfig()
        self.model = part.model.to(device).eval()
        self.tokenizer = part.tokenizer
        self.meta = part.meta
        self.device = torch.device(device)
        self.fast_busy = fast_busy
        self.frame_cache = FrameTokenCache(int(self.config.frame_cache_mb * 1024 * 1024))
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "steps": 0, "max_rows": 0, "yield_waits": 0}

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("describe engine already started")
        # One OpenMP team per process (vision.cpu_threads): on a CPU, decoding must not slow the fast path.
        self._thread = start_single_threaded(self._run, name="lineinspect-describe")

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests --------------------------------------------------------------------------
    def check(self, question: str, max_tokens: int, temperature: float) -> tuple[list[int], int, float]:
        """Validate a request -> (prompt ids, max_tokens, temperature); LineInspectError says what is wrong."""
        cfg = self.config
        if len(question) > cfg.max_question_chars:
            raise LineInspectError(f"question: {len(question)} characters; at most {cfg.max_question_chars}")
        if max_tokens < 0 or max_tokens > cfg.max_tokens_limit:
            raise LineInspectError(f"max_tokens: {max_tokens} is outside 0..{cfg.max_tokens_limit} (0 = default)")
        if not 0.0 <= temperature <= cfg.max_temperature or temperature != temperature:
            raise LineInspectError(f"temperature: {temperature} is outside 0..{cfg.max_temperature} (0 = greedy)")
        prompt = self.tokenizer.encode(prompt_text(question))
        n = max_tokens or cfg.default_max_tokens
        limit = self.model.config.decoder.max_seq_len
        if len(prompt) + n > limit:
            raise LineInspectError(
                f"question: {len(prompt)} prompt tokens + max_tokens {n} exceed the decoder's {limit}; "
                "shorten the question or lower max_tokens"
            )
        return prompt, n, float(temperature)

    async def describe(self, evidence: torch.Tensor, question: str = "", max_tokens: int = 0,
                       temperature: float = 0.0, seed: int | None = None) -> AsyncIterator[Chunk]:
        """Stream the answer for evidence tokens (N, D) of one image."""
        prompt, n, temp = self.check(question, max_tokens, temperature)
        expected = self.model.config.evidence
        if tuple(evidence.shape) != (expected.n_tokens, expected.dim):
            raise LineInspectError(f"describe: evidence must be ({expected.n_tokens}, {expected.dim}), "
                                   f"got {tuple(evidence.shape)}")
        generator = None
        if temp > 0:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        job = _Job(prompt, evidence, n, temp, asyncio.get_running_loop(), asyncio.Queue(), TextDelta(self.tokenizer),
                   generator)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("server is shutting down; no new work accepted")
            if len(self._pending) >= self.config.queue_size:
                raise Overloaded(f"describe queue is full ({self.config.queue_size} requests waiting); retry later")
            self._pending.append(job)
            self.stats["requests"] += 1
            self._cond.notify()
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            job.cancelled = True  # finished, failed, or the caller went away: the thread drops it

    # ---- the decode thread -----------------------------------------------------------------
    def _run(self) -> None:
        rows: list[_Job] = []
        cache: KVCache | None = None
        logits: torch.Tensor | None = None  # (B, V) next-token logits of `rows`
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and not rows and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        self._fail(rows + list(self._pending), ShuttingDown("server shut down during generation"))
                        self._pending.clear()
                        return
                    new = self._admit(rows, cache)
                try:
                    if new:
                        cache, logits = self._prefill(new, rows, cache, logits)
                        rows = rows + new
                    if rows:
                        rows, cache, logits = self._step(rows, cache, logits)
                except Exception as exc:  # a failed step fails its requests, never the thread
                    log.exception("describe step failed", extra={"rows": len(rows) + len(new)})
                    self._fail(rows + new, exc)
                    rows, cache, logits = [], None, None

    def _admit(self, rows: list[_Job], cache: KVCache | None) -> list[_Job]:
        """Waiting jobs that fit the batch now (called with the condition held)."""
        new: list[_Job] = []
        length = _trim(cache)[1] if cache is not None else 0
        limit = self.model.config.decoder.max_seq_len
        room = max((j.max_tokens - len(j.tokens) for j in rows), default=0)
        while self._pending and len(rows) + len(new) < self.config.max_batch:
            job = self._pending[0]
            if job.cancelled:
                self._pending.popleft()
                continue
            # all rows share one slot counter: the merged batch must fit the decoder's context
            new_len = max(length, max(len(j.prompt) for j in [*new, job]))
            new_room = max(room, *(j.max_tokens for j in [*new, job]))
            if new_len + new_room > limit:
                break
            new.append(self._pending.popleft())
        return new

    def _prefill(self, new: list[_Job], rows: list[_Job], cache: KVCache | None, logits: torch.Tensor | None
                 ) -> tuple[KVCache, torch.Tensor]:
        decoder = self.model.decoder
        idx, mask = left_pad([j.prompt for j in new], self.tokenizer.pad_id, self.device)
        evidence = torch.stack([j.evidence for j in new]).to(self.device)  # (b, N, D)
        image = self.model.image_tokens(evidence)  # (b, L, D)
        fresh = KVCache.allocate(decoder.config, len(new), idx.shape[1], self.device, decoder.tok_emb.weight.dtype)
        out = decoder(idx, image_tokens=image, kv_cache=fresh, attention_mask=mask)
        room = max(j.max_tokens - len(j.tokens) for j in [*rows, *new])
        merged = merge_caches([c for c in (cache, fresh) if c is not None], room)
        last = out.logits[:, -1]
        return merged, last if logits is None else torch.cat([logits, last])

    def _step(self, rows: list[_Job], cache: KVCache, logits: torch.Tensor
              ) -> tuple[list[_Job], KVCache | None, torch.Tensor | None]:
        """Sample one token per row, send text, drop finished rows, then one decoder step."""
        tokens = self._sample(logits, rows)  # (B,)
        keep: list[int] = []
        eos = self.tokenizer.eos_id
        for i, (job, token) in enumerate(zip(rows, tokens.tolist())):
            if job.cancelled:
                continue
            stop = token == eos
            if not stop:
                job.tokens.append(token)
            finish = "stop" if stop else "length" if len(job.tokens) >= job.max_tokens else ""
            text = job.delta.push(job.tokens, final=bool(finish))
            if text or finish:
                job.send(Chunk(text, bool(finish), len(job.tokens), finish))
            if not finish:
                keep.append(i)
        if not keep:
            return [], None, None
        if len(keep) < len(rows):
            index = torch.as_tensor(keep, device=self.device)
            cache, tokens = select_rows(cache, index), tokens[index]
            rows = [rows[i] for i in keep]
        self._wait_for_fast_path()
        out = self.model.decoder(tokens[:, None], kv_cache=cache,
                                 attention_mask=torch.ones(len(rows), 1, dtype=torch.bool, device=self.device))
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        return rows, cache, out.logits[:, -1]

    def _sample(self, logits: torch.Tensor, rows: list[_Job]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)  # (B,)
        for i, job in enumerate(rows):
            if job.temperature > 0:
                probs = (logits[i].float() / job.temperature).softmax(dim=-1)
                tokens[i] = torch.multinomial(probs.cpu(), 1, generator=job.generator)[0]
        return tokens

    def _wait_for_fast_path(self) -> None:
        waited = False
        while self.fast_busy() and not self._stopping:
            waited = True
            time.sleep(0.0005)
        if waited:
            self.stats["yield_waits"] += 1

    @staticmethod
    def _fail(jobs: Sequence[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.cancelled:
                job.send(exc)


# --------------------------------------------------------------------------- local (no server)


def answer_stream(part: LanguagePart, evidence: torch.Tensor, question: str = "", max_tokens: int = 96,
                  temperature: float = 0.0, seed: int = 0) -> Iterator[str]:
    """Text pieces of the answer for evidence tokens (N, D), generated in this thread."""
    model, tok = part.model, part.tokenizer
    device = model.decoder.tok_emb.weight.device
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, eos_id=tok.eos_id,
                              pad_id=tok.pad_id)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    delta = TextDelta(tok)
    ids: list[int] = []
    with torch.inference_mode():
        image = model.image_tokens(evidence[None].to(device))
        for step in stream(model.decoder, [tok.encode(prompt_text(question))], sampling, image, None, generator):
            token = int(step.tokens[0])
            if token == tok.eos_id:
                break
            ids.append(token)
            text = delta.push(ids)
            if text:
                yield text
    tail = delta.push(ids, final=True)
    if tail:
        yield tail


def image_evidence(inspector, part: LanguagePart, image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> evidence tokens (N, D) through the inspector's own model call."""
    from lineinspect.vision.preprocess import to_batch

    batch = to_batch([image], inspector.input_size, inspector.device)
    out = inspector.run_model(batch)
    config, cal = part.model.config.evidence, inspector.calibration
    with torch.inference_mode():
        decision = (calibrated_score(out, cal), cal.threshold) if config.decision else None
        ev = evidence_tokens(out.patches, out.anomaly_map, out.image_prob, out.class_logits, config, batch, decision)
    return ev[0].float()
