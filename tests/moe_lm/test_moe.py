"""MoE block: capacity overflow is counted, expert counts add up, router and bias balancing."""

from __future__ import annotations

import copy
import threading

import torch

from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.moe import DENSE_DISPATCH_ROWS, MoEBlock, expert_capacity
from lineinspect.moe_lm.router import Router


def _skewed_block(**overrides) -> MoEBlock:
    """A block whose router sends every positive input to experts 0 and 1."""
    torch.manual_seed(0)
    block = MoEBlock(preset("tiny", **overrides))
    with torch.no_grad():
        block.router.proj.weight.zero_()
        block.router.proj.weight[0] = 1.0
        block.router.proj.weight[1] = 0.9
    return block


def test_capacity_overflow_is_counted_and_tokens_keep_the_shared_expert() -> None:
    block = _skewed_block(capacity_factor=1.0).train()
    x = torch.rand(1, 8, 64) + 0.1  # positive, so logits 0 > 1 > 0 = the rest
    N, k, E = 8, 2, 16
    capacity = expert_capacity(1.0, N, k, E)
    assert capacity == 1
    out, stats = block(x)
    assert stats.counts[:2].tolist() == [8, 8] and int(stats.counts.sum()) == N * k
    assert stats.overflow[:2].tolist() == [7, 7] and int(stats.overflow[2:].sum()) == 0
    shared = block.shared(x)
    # Token 0 came first and got both experts; tokens 1..7 overflowed both and got the shared expert only.
    torch.testing.assert_close(out[:, 1:], shared[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(out[:, 0], shared[:, 0], atol=1e-6)
    assert torch.isfinite(out).all()
    # At inference the capacity does not apply: nothing overflows and every token gets its experts.
    out_eval, stats_eval = block.eval()(x)
    assert int(stats_eval.overflow.sum()) == 0
    assert not torch.allclose(out_eval[:, 1:], shared[:, 1:], atol=1e-6)


def test_expert_counts_sum_to_tokens_times_top_k() -> None:
    torch.manual_seed(1)
    block = MoEBlock(preset("tiny", top_k=3, n_routed_experts=8)).eval()
    out, stats = block(torch.randn(4, 5, 64))
    assert out.shape == (4, 5, 64)
    assert stats.counts.shape == (8,) and int(stats.counts.sum()) == 4 * 5 * 3
    assert stats.router_logits.shape == (20, 8) and stats.router_logits.dtype == torch.float32


def test_block_without_shared_experts() -> None:
    block = _skewed_block(n_shared_experts=0, capacity_factor=1.0).train()
    out, stats = block(torch.rand(1, 4, 64) + 0.1)
    assert block.shared is None
    assert torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))  # overflowed: no routed, no shared
    assert int(stats.overflow.sum()) == 6


def test_router_weights_renormalised_and_softmax_in_float32() -> None:
    torch.manual_seed(2)
    router = Router(16, 6, 2).to(torch.bfloat16)
    out = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
    probs = out.logits.softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(out.indices, top.indices)
    torch.testing.assert_close(out.weights, top.values / top.values.sum(-1, keepdim=True))


def test_bias_balancing_shifts_selection_not_weights() -> None:
    torch.manual_seed(3)
    router = Router(8, 4, 1, balance_bias=True)
    with torch.no_grad():
        router.proj.weight[0] += 0.3  # expert 0 is favoured for positive inputs
    x = torch.randn(64, 8) + 1
    before = router(x)
    load_before = torch.bincount(before.indices.flatten(), minlength=4)
    assert int(load_before.argmax()) == 0 and int(load_before.max()) > 32
    for _ in range(100):  # what the training step does after each optimiser step
        router.update_bias(torch.bincount(router(x).indices.flatten(), minlength=4), rate=0.01)
    after = router(x)
    load_after = torch.bincount(after.indices.flatten(), minlength=4)
    assert router.balance_bias[0] < 0
    assert int(load_after.max() - load_after.min()) < int(load_before.max() - load_before.min()) // 2
    torch.testing.assert_close(after.logits, before.logits)  # the bias never touches the logits
    torch.testing.assert_close(after.weights, torch.ones(64, 1))  # top-1 weights stay renormalised
    assert not router.balance_bias.requires_grad


def test_few_tokens_run_every_expert_and_agree_with_the_sorted_dispatch() -> None:
    torch.manual_seed(4)
    block = MoEBlock(preset("tiny")).eval()
    x = torch.randn(2, 5, 64)
    assert 2 * 5 * block.n_experts <= DENSE_DISPATCH_ROWS  # decoding-sized: every expert runs
    with torch.no_grad():
        every, every_stats = block(x)
        block.dense_dispatch_rows = 0
        grouped, grouped_stats = block(x)
    torch.testing.assert_close(every, grouped, rtol=1e-5, atol=1e-6)
    assert torch.equal(every_stats.counts, grouped_stats.counts) and int(every_stats.counts.sum()) == 2 * 5 * 2
    assert int(every_stats.overflow.sum()) == 0


def test_copies_leave_the_side_stream_behind() -> None:
    """A CUDA stream cannot be copied; the gates-closed ablation deep-copies the report model."""
    block = MoEBlock(preset("tiny"))
    block._side_stream = threading.Lock()  # stands in for a torch.cuda.Stream: neither can be copied
    twin = copy.deepcopy(block)
    assert twin._side_stream is None and block._side_stream is not None
    x = torch.randn(1, 3, block.router.proj.in_features)
    torch.testing.assert_close(twin.eval()(x)[0], block.eval()(x)[0])
