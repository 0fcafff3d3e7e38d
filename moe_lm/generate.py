"""Token generation with the KV cache: greedy, temperature and top-p sampling, streamed.

Batching: B prompts of different lengths are left-padded to one length with an attention mask.
Rotary positions count real tokens only and padded keys are masked, so each row decodes as it
would alone (to rounding). All rows then advance one token per step; a row that emits <eos>
stops (its later slots are padding) and the stream ends when every row has stopped or
max_new_tokens is reached. The cache and the random generator are per call, never on the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.decoder import MoEDecoder
from lineinspect.moe_lm.kv_cache import KVCache


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens whose probability >= top_p
    eos_id: int = 2
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise LineInspectError(f"sampling: max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LineInspectError(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LineInspectError(f"sampling: top_p must be in (0, 1], got {self.top_p}")


class Step(NamedTuple):
    tokens: torch.Tensor  # (B,) long: this step's token per row, pad_id for rows already stopped
    active: torch.Tensor  # (B,) bool: rows that produced a token this step


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> idx (B, T) left-padded with pad_id, mask (B, T) bool."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LineInspectError("generate: every prompt needs at least one token (e.g. <bos>)")
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, T - len(p):] = True
    return idx.to(device), mask.to(device)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) -> logits with tokens outside the nucleus set to -inf (the top token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_token(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(logits.float() / sampling.temperature, sampling.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def stream(
    model: MoEDecoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    image_tokens: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Yield one Step per generated position. image_tokens: (B, L, D_img) for the B prompts, or None.

    The model must be in eval mode (capacity limits and expert dropout are training-only).
    """
    if model.training:
        raise LineInspectError("generate: the decoder is in training mode; call model.eval() first")
    device = model.tok_emb.weight.device
    idx, mask = left_pad(prompts, sampling.pad_id, device)
    B, T = idx.shape
    cache = KVCache.allocate(model.config, B, T + sampling.max_new_tokens, device, model.tok_emb.weight.dtype)
    out = model(idx, image_tokens=image_tokens, image_mask=image_mask, kv_cache=cache, attention_mask=mask)
    active = torch.ones(B, dtype=torch.bool, device=device)
    for step in range(sampling.max_new_tokens):
        token = next_token(out.logits[:, -1], sampling, generator)  # (B,)
        token = torch.where(active, token, torch.full_like(token, sampling.pad_id))
        yield Step(token, active.clone())
        active = active & (token != sampling.eos_id)
        if step + 1 == sampling.max_new_tokens or not bool(active.any()):
            return
        out = model(token[:, None], kv_cache=cache, attention_mask=active[:, None])


def generate(
    model: MoEDecoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    image_tokens: torch.Tensor | None = None,
    image_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The generated ids per prompt, <eos> excluded."""
    result: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, sampling, image_tokens, image_mask, generator):
        for row in torch.nonzero(step.active & (step.tokens != sampling.eos_id)).flatten().tolist():
            result[row].append(int(step.tokens[row]))
    return result
