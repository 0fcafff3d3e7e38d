"""The fused element-wise kernels of the MoE block against eager PyTorch (their oracle).

Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, hence a subprocess) runs
the very kernels on CPU tensors, so their indexing and masking are checked on every machine; the
CUDA test checks the compiled kernels inside the block."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from lineinspect.moe_lm import fused
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.fused import (
    EAGER_MIN_ELEMENTS,
    gather_sum,
    set_fused_kernels,
    silu_mul,
    silu_mul_key,
    use_triton,
)
from lineinspect.moe_lm.moe import MoEBlock
from lineinspect.vision.cuda_graphs import capture_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_eager_silu_mul_and_gather_sum_by_hand() -> None:
    gate, up = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([[3.0, 2.0], [1.0, 4.0]])
    scale = torch.tensor([1.0, 0.5])
    expected = torch.stack([F.silu(gate[0]) * up[0], 0.5 * F.silu(gate[1]) * up[1]])
    torch.testing.assert_close(silu_mul(gate, up, scale), expected)
    rows, index, base = torch.arange(8.0).view(4, 2), torch.tensor([[3, 0], [1, 1]]), torch.ones(2, 2)
    torch.testing.assert_close(gather_sum(base, rows, index), torch.tensor([[7.0, 9.0], [5.0, 7.0]]))
    torch.testing.assert_close(gather_sum(None, rows, index), torch.tensor([[6.0, 8.0], [4.0, 6.0]]))


def test_triton_only_for_cuda_tensors() -> None:
    x = torch.ones(2, 3)
    assert not use_triton(("silu_mul",), x, numel=1 << 30)  # CPU
    assert not use_triton(("silu_mul",), None, x, numel=1 << 30)


def test_a_kernel_that_cannot_run_here_falls_back_to_pytorch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_loaded", set())
    monkeypatch.setattr(fused, "_failed", set())
    # as on a GPU whose first launch fails: asked until it has failed
    monkeypatch.setattr(fused, "use_triton", lambda key, *t, numel: (*key, t[0].device) not in fused._failed)
    calls = []

    def broken(*args: object) -> torch.Tensor:
        calls.append(args)
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(fused, "_silu_mul_triton", broken)
    gate, up = torch.randn(3, 32), torch.randn(3, 32)
    with pytest.warns(RuntimeWarning, match="cannot run"):
        first = silu_mul(gate, up)
    torch.testing.assert_close(first, F.silu(gate) * up)
    torch.testing.assert_close(silu_mul(gate, up), first)
    assert len(calls) == 1 and len(fused._failed) == 1  # tried once, then PyTorch


INTERPRETED = textwrap.dedent("""
    import torch
    from lineinspect.moe_lm import fused
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 4e-2)):
        gate_up = torch.randn(7, 2 * 1500).to(dtype)  # H = 1500: two column blocks, the second masked
        gate, up = gate_up[:, :1500], gate_up[:, 1500:]  # strided halves, as one gate-up GEMM gives them
        scale = torch.rand(7)
        for s in (scale, None):
            got = fused._silu_mul_triton(gate, up, s)
            assert got.dtype == dtype and got.is_contiguous()
            torch.testing.assert_close(got.float(), fused.silu_mul(gate, up, s).float(), rtol=tol, atol=tol)
        batched = torch.randn(3, 4, 1500).to(dtype)  # (E, N, H) from batched products, scale (E, N)
        torch.testing.assert_close(fused._silu_mul_triton(batched, batched, scale[:6].view(3, 2).repeat(1, 2)).float(),
                                   fused.silu_mul(batched, batched, scale[:6].view(3, 2).repeat(1, 2)).float(),
                                   rtol=tol, atol=tol)
        rows, base = torch.randn(10, 1100).to(dtype), torch.randn(5, 1100).to(dtype)
        index = torch.tensor([[9, 0], [3, 3], [1, 8], [2, 7], [6, 5]])
        for b in (base, None):
            torch.testing.assert_close(fused._gather_sum_triton(b, rows, index).float(),
                                       fused.gather_sum(b, rows, index).float(), rtol=tol, atol=tol)
    print("ok")
""")


def test_triton_kernels_match_eager_in_the_interpreter(run_in_interpreter) -> None:
    run_in_interpreter(INTERPRETED)


@needs_cuda
def test_triton_runs_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_loaded", set())
    x, key = torch.ones(4, device="cuda"), ("variant",)
    assert use_triton(key, x, numel=1)  # not loaded yet: the first eager call loads it, whatever its size
    fused._loaded.add((*key, x.device))
    assert not use_triton(key, x, numel=EAGER_MIN_ELEMENTS - 1)  # loaded, small, eager: launch-bound
    assert use_triton(key, x, numel=EAGER_MIN_ELEMENTS)
    w = x.clone().requires_grad_()
    assert not use_triton(key, w, numel=EAGER_MIN_ELEMENTS)  # no backward
    with torch.no_grad():
        assert use_triton(key, w, numel=EAGER_MIN_ELEMENTS)


@needs_cuda
def test_a_graph_capture_uses_the_kernels_its_warm_up_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_loaded", set())
    gate, up = torch.randn(2, 8, 256, device="cuda", dtype=torch.bfloat16).unbind(0)
    with torch.no_grad():
        graph, out = capture_graph(lambda: silu_mul(gate, up), gate.device)
        key = (*silu_mul_key(torch.bfloat16, False, 256, 256, 256), gate.device)
        assert key in fused._loaded  # the warm-up loaded it; the capture then used it
        gate.copy_(torch.randn_like(gate))
        graph.replay()
        torch.testing.assert_close(out.float(), (F.silu(gate.float()) * up.float()), rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("tokens", [48, 700])  # every-expert dispatch, grouped dispatch
def test_block_with_fused_kernels_matches_eager_on_cuda(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "EAGER_MIN_ELEMENTS", 0)  # small test sizes take the Triton kernels too
    torch.manual_seed(0)
    block = MoEBlock(preset("tiny", width=128, n_heads=4, expert_hidden=256)).cuda().to(torch.bfloat16).eval()
    x = torch.randn(2, tokens, 128, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused_out, fused_stats = block(x)
        set_fused_kernels(block, False)
        eager_out, eager_stats = block(x)
    torch.testing.assert_close(fused_out.float(), eager_out.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(fused_stats.counts, eager_stats.counts)
