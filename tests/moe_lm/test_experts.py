"""Grouped expert computation against the per-expert Python loop (the test oracle), fwd and bwd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.experts import grouped_mm_supported
from lineinspect.moe_lm.moe import MoEBlock, expert_capacity
from lineinspect.vision.cuda_graphs import capture_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def loop_moe(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """The oracle: route, then run each expert on its own tokens in a Python loop."""
    B, T, C = x.shape
    flat = x.reshape(-1, C)
    route = block.router(flat)
    E, k = block.n_experts, block.top_k
    capacity = None
    if block.training and block.capacity_factor is not None:
        capacity = expert_capacity(block.capacity_factor, flat.shape[0], k, E)
    out = torch.zeros_like(flat)
    ex = block.experts
    for e in range(E):
        tokens, slots = torch.nonzero(route.indices == e, as_tuple=True)  # ordered by token
        if capacity is not None:
            tokens, slots = tokens[:capacity], slots[:capacity]
        if tokens.numel() == 0:
            continue
        gate, up = (flat[tokens] @ ex.w_gate_up[e]).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ ex.w_down[e]
        out = out.index_add(0, tokens, (y * route.weights[tokens, slots, None]).to(out.dtype))
    if block.shared is not None:
        out = out + block.shared(flat)
    return out.view(B, T, C)


def _block(impl: str, **overrides) -> MoEBlock:
    torch.manual_seed(0)
    cfg = preset("tiny", expert_impl=impl, **overrides)
    block = MoEBlock(cfg)
    torch.nn.init.normal_(block.router.proj.weight, std=0.5)  # spread tokens over many experts
    return block


def _grads(block: MoEBlock, x: torch.Tensor, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    block.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [x.grad] + [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("impl", ["grouped_mm", "padded_bmm"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_grouped_matches_loop_forward_and_backward(impl: str, capacity_factor: float | None) -> None:
    block = _block(impl, capacity_factor=capacity_factor).train()
    x = torch.randn(3, 7, block.router.proj.in_features)
    out, grads = _grads(block, x, lambda t: block(t)[0])
    ref, ref_grads = _grads(block, x, lambda t: loop_moe(block, t))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    assert "experts.w_gate_up" in names and "experts.w_down" in names
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")
    if capacity_factor is not None:
        assert int(block(x)[1].overflow.sum()) > 0  # the capacity really bound in this case


def test_grouped_mm_bf16_matches_padded_bmm() -> None:
    block = _block("grouped_mm").to(torch.bfloat16).eval()
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)
    out = block(x)[0].float()
    block.experts.impl = "padded_bmm"
    torch.testing.assert_close(out, block(x)[0].float(), rtol=2e-2, atol=2e-3)


def test_auto_falls_back_when_grouped_mm_cannot_run() -> None:
    assert not grouped_mm_supported(torch.device("cpu"), torch.float64, (64, 128))
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, (6, 128))  # 24-byte rows
    block = _block("auto", width=60, n_heads=2, n_kv_heads=None, expert_hidden=30).double()
    x = torch.randn(2, 5, 60, dtype=torch.float64)
    assert block.experts.resolve_impl(x) == "padded_bmm"
    torch.testing.assert_close(block(x)[0], loop_moe(block, x))
    block.experts.impl = "grouped_mm"
    with pytest.raises(LineInspectError, match="padded_bmm"):
        block(x)


def test_expert_dropout_is_training_only() -> None:
    block = _block("padded_bmm", expert_dropout=0.5)
    x = torch.randn(2, 6, 64)
    block.eval()
    torch.testing.assert_close(block(x)[0], loop_moe(block, x), rtol=1e-5, atol=1e-6)
    reference = loop_moe(block, x)
    block.train()
    dropped = block(x)[0]
    assert not torch.allclose(dropped, reference, atol=1e-4)


@pytest.mark.parametrize(("capacity_factor", "mode"), [(None, "train"), (0.5, "train"), (None, "eval")])
def test_grouped_path_never_reads_device_values_on_the_host(capacity_factor: float | None, mode: str) -> None:
    """Fake tensors carry no data: any .item(), .tolist(), bincount or boolean-mask shape on the
    path (forward or backward) raises, so passing here means the block can run under a CUDA graph.
    In eval mode these 18 tokens take the every-expert dispatch of decoding steps."""
    block = _block("grouped_mm", capacity_factor=capacity_factor).to(torch.bfloat16).train(mode == "train")
    if block.experts.resolve_impl(torch.ones(1, 64, dtype=torch.bfloat16)) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run on this CPU")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 9, 64, dtype=torch.bfloat16, requires_grad=True)
        out, stats = block(x)
        out.float().sum().backward()
    assert out.shape == (2, 9, 64) and stats.overflow.shape == (16,)


@needs_cuda
@pytest.mark.parametrize("tokens", [48, 400])  # every-expert dispatch, sorted dispatch
def test_block_replays_from_a_cuda_graph(tokens: int) -> None:
    block = _block("auto").cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, tokens, 64, device="cuda", dtype=torch.bfloat16)
    if block.experts.resolve_impl(x) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run on this GPU")
    with torch.no_grad():
        graph, (static_out, static_stats) = capture_graph(lambda: block(x), x.device)
        x.copy_(torch.randn_like(x))
        graph.replay()
        out, stats = block(x)
    torch.testing.assert_close(static_out, out, rtol=2e-2, atol=2e-3)
    assert torch.equal(static_stats.counts, stats.counts)
