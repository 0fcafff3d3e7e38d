"""Generation: greedy determinism, batched == one at a time, streaming, eos, top-p, sampling."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.decoder import MoEDecoder
from lineinspect.moe_lm.generate import SamplingConfig, generate, left_pad, stream, top_p_filter


def _model() -> MoEDecoder:
    torch.manual_seed(0)
    # untied head: a random tied model mostly repeats its input token, which would test little
    model = MoEDecoder(preset("tiny", tie_embeddings=False)).eval()
    with torch.no_grad():  # open the gates so image tokens matter
        for block in model.blocks:
            block.xattn.gate_scale.fill_(1.0)
    return model


def _greedy_reference(model: MoEDecoder, prompt: list[int], n: int, image: torch.Tensor | None) -> list[int]:
    """Greedy decoding by re-running the full sequence each step (no cache)."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), image_tokens=image).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_is_deterministic_and_matches_uncached_decoding() -> None:
    model = _model()
    prompts = [[1, 17, 99, 23, 5], [1, 42], [1, 300, 301]]
    images = torch.randn(3, 4, model.config.context_dim)
    sampling = SamplingConfig(max_new_tokens=6, eos_id=-1)  # no eos: run to max tokens
    first = generate(model, prompts, sampling, image_tokens=images)
    assert first == generate(model, prompts, sampling, image_tokens=images)
    assert [len(r) for r in first] == [6, 6, 6]
    for row, prompt in enumerate(prompts):  # batched with left padding == each prompt alone, uncached
        assert first[row] == _greedy_reference(model, prompt, 6, images[row : row + 1])


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_stream_yields_one_token_per_step_and_stops_at_eos() -> None:
    model = _model()
    prompts = [[1, 17, 99], [1, 42]]
    free = generate(model, prompts, SamplingConfig(max_new_tokens=6, eos_id=-1))[0:2]
    # make row 0's third token the eos (one it has not emitted before)
    j = next(i for i in range(2, 6) if free[0][i] not in free[0][:i])
    eos = free[0][j]
    steps = list(stream(model, prompts, SamplingConfig(max_new_tokens=6, eos_id=eos, pad_id=0)))
    assert all(s.tokens.shape == (2,) and s.active.shape == (2,) for s in steps)
    assert [int(s.tokens[0]) for s in steps[: j + 1]] == free[0][: j + 1]
    assert all(bool(s.active[0]) for s in steps[: j + 1])
    assert not any(bool(s.active[0]) for s in steps[j + 1 :])
    assert all(int(s.tokens[0]) == 0 for s in steps[j + 1 :])  # a stopped row yields pad
    result = generate(model, prompts, SamplingConfig(max_new_tokens=6, eos_id=eos))
    assert result == [free[0][:j], _until(free[1], eos)]  # eos excluded, each row stops on its own
    expected_steps = 6 if eos not in free[1] else max(j, free[1].index(eos)) + 1
    assert len(steps) == expected_steps and any(not bool(s.active[0]) for s in steps)
    # every row stops -> the stream ends early
    one = list(stream(model, [[1, 17, 99]], SamplingConfig(max_new_tokens=6, eos_id=free[0][0])))
    assert len(one) == 1


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = _model()
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, eos_id=-1)
    runs = [generate(model, [[1, 5]], sampling, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]
    other = generate(model, [[1, 5]], sampling, generator=torch.Generator().manual_seed(8))
    assert other != runs[0]  # 8 tokens from ~500 near-uniform choices: a tie is vanishingly unlikely


def test_top_p_filter_hand_computed() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = top_p_filter(logits, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.8
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 0.01).isfinite().sum() == 1  # the top token always stays
    shuffled = logits[:, [2, 0, 3, 1]]
    assert top_p_filter(shuffled, 0.7).isfinite().tolist() == [[False, True, False, True]]


def test_inputs_are_checked() -> None:
    model = _model()
    assert left_pad([[5, 6, 7], [8]], pad_id=0)[0].tolist() == [[5, 6, 7], [0, 0, 8]]
    with pytest.raises(LineInspectError, match="at least one token"):
        generate(model, [[]], SamplingConfig())
    with pytest.raises(LineInspectError, match="max_seq_len"):
        generate(model, [[1]], SamplingConfig(max_new_tokens=model.config.max_seq_len))
    with pytest.raises(LineInspectError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(LineInspectError, match="eval"):
        generate(model.train(), [[1]], SamplingConfig())
