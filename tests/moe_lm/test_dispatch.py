"""Dispatch: the eager counting against its definition, and the Triton route-and-dispatch kernels
against the router's selection plus the eager counting (Triton's interpreter on CPU tensors, in a
subprocess; on CUDA the block's own tests compare it with the kernels off)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from lineinspect.moe_lm import fused
from lineinspect.moe_lm.dispatch import count_dispatch, route_and_dispatch
from lineinspect.moe_lm.router import Router
from lineinspect.vision.cuda_graphs import capture_graph


def test_counting_puts_rows_in_expert_order_and_token_order_within_an_expert() -> None:
    indices = torch.tensor([[2, 0], [0, 2], [1, 0], [2, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]])
    d, overflow = count_dispatch(indices, weights, n_experts=4)
    assert d.counts.tolist() == [3, 2, 3, 0] and d.ends.tolist() == [3, 5, 8, 8]  # expert 3: an empty group
    assert d.token.tolist() == [0, 1, 2, 2, 3, 0, 1, 3]
    torch.testing.assert_close(d.scale, torch.tensor([0.4, 0.7, 0.5, 0.5, 0.1, 0.6, 0.3, 0.9]))
    # each assignment's row holds its token and weight
    assert d.token[d.row_of].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3]]
    torch.testing.assert_close(d.scale[d.row_of], weights)
    assert overflow.tolist() == [0, 0, 0, 0]


def test_capacity_zeroes_the_weight_of_an_experts_late_assignments() -> None:
    indices = torch.tensor([[0, 1], [0, 1], [0, 2]])
    d, overflow = count_dispatch(indices, torch.full((3, 2), 0.5), n_experts=3, capacity=2)
    assert overflow.tolist() == [1, 0, 0]
    assert d.scale.tolist() == [0.5, 0.5, 0.0, 0.5, 0.5, 0.5]  # expert 0's third row (token 2) adds nothing


def test_the_kernels_leave_cpu_tensors_to_the_eager_path() -> None:
    assert route_and_dispatch(torch.randn(5, 4), 2) is None
    assert route_and_dispatch(torch.randn(0, 4), 2) is None  # no tokens: nothing to launch


INTERPRETED = textwrap.dedent("""
    import torch
    from lineinspect.moe_lm import dispatch
    from lineinspect.moe_lm.router import Router
    torch.manual_seed(0)
    # 300 tokens: two full blocks of 128 and a part one; 7 experts and 3 slots pad to powers of two
    for tokens, experts, k, biased in ((300, 16, 2, False), (300, 7, 3, False), (129, 16, 2, True), (1, 4, 1, False)):
        router = Router(8, experts, k, balance_bias=biased)
        if biased:
            router.balance_bias.uniform_(-0.2, 0.2)
        logits = torch.randn(tokens, experts)
        got = dispatch._route_dispatch_triton(logits, k, router.balance_bias)
        route = router.select(logits)
        want, _ = dispatch.count_dispatch(route.indices, route.weights, experts)
        for name in ("token", "ends", "counts", "row_of"):
            assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), (tokens, experts, k, name)
        torch.testing.assert_close(got.scale, want.scale)
        assert got.ends.dtype == torch.int32 and got.counts.dtype == torch.int64
    print("ok")
""")


def test_route_and_dispatch_kernels_match_the_router_and_counting_in_the_interpreter(run_in_interpreter) -> None:
    run_in_interpreter(INTERPRETED)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_and_replay_from_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_loaded", set())
    torch.manual_seed(0)
    router = Router(8, 16, 2).cuda()
    logits = torch.randn(4096, 16, device="cuda")
    with torch.no_grad():
        graph, got = capture_graph(lambda: route_and_dispatch(logits, 2), logits.device)
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        route = router.select(logits)
        want, _ = count_dispatch(route.indices, route.weights, 16)
    for name in ("token", "ends", "counts", "row_of"):
        assert torch.equal(getattr(got, name).long(), getattr(want, name).long()), name
    torch.testing.assert_close(got.scale, want.scale)
