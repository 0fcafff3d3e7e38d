"""The fused gate-up kernel (gather, grouped GEMM, activation) against a per-expert loop (its oracle)
and the layer with it against the layer without it.

Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported, hence a subprocess) runs
the kernel on CPU tensors in fp32 and fp16; it multiplies bf16 wrongly (its ``tl.dot`` takes bf16's
bit patterns for numbers), so bf16 is checked on CUDA only, with the compiled kernel."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import torch.nn.functional as F

from lineinspect.moe_lm import fused, fused_gemm
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.fused_gemm import CONFIGS, LARGE_CONFIG, SMALL_CONFIG, config_for_rows, set_fused_gemm
from lineinspect.moe_lm.moe import MoEBlock
from lineinspect.vision.cuda_graphs import capture_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def loop_gate_up(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, w: torch.Tensor,
                 scale: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up * scale of each expert's rows, one expert at a time, in fp32."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        gate, up = (x[index[start:end]].float() @ w[e].float()).chunk(2, dim=-1)
        out.append(F.silu(gate) * up)
        start = end
    h = torch.cat(out)
    return h if scale is None else h * scale[:, None].float()


def groups(sizes: list[int], tokens: int, width: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random token rows (T, C), expert weights (E, C, 2H), and for groups of `sizes` rows each
    row's token index, the groups' ends and a scale per row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    w = (torch.randn(len(sizes), width, 2 * hidden, generator=g) / width**0.5).to(dtype)
    index = torch.randint(0, tokens, (sum(sizes),), generator=g)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return x, index, offs, w, torch.rand(sum(sizes), generator=g)


INTERPRETED = "\n".join(["import torch", "import torch.nn.functional as F", inspect.getsource(loop_gate_up),
                         inspect.getsource(groups)]) + textwrap.dedent("""
    from lineinspect.moe_lm.fused_gemm import CONFIGS, SMALL_CONFIG, GemmConfig, _gate_up_silu_triton
    # Empty groups first, inside and last; groups smaller than a tile, of exactly one, and over
    # three tiles; E = 7 is not a power of two. C = 80 leaves a part step of 16 on 32-wide steps and
    # H = 48 a part column block; 2-tile column groups leave a part group at the end of the grid.
    sizes = [0, 3, 37, 16, 0, 4, 0]
    small = GemmConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x, index, offs, w, scale = groups(sizes, 30, 80, 48, dtype)
        for config in (small, CONFIGS[SMALL_CONFIG]):
            for s in (scale, None):
                for idx in (index, index.to(torch.int32)):
                    got = _gate_up_silu_triton(x, idx, offs, w, s, config)
                    assert got.dtype == dtype and got.shape == (sum(sizes), 48)
                    torch.testing.assert_close(got.float(), loop_gate_up(x, index, offs, w, s), rtol=tol, atol=tol)
    print("ok")
""")


def test_kernel_matches_the_loop_in_the_interpreter(run_in_interpreter) -> None:
    run_in_interpreter(INTERPRETED)


def _block(tokens: int) -> tuple[MoEBlock, torch.Tensor]:
    """A bf16 block in eval mode whose router spreads its tokens over many experts, and its input."""
    torch.manual_seed(0)
    block = MoEBlock(preset("tiny", width=128, n_heads=4, expert_hidden=256)).to(torch.bfloat16).eval()
    torch.nn.init.normal_(block.router.proj.weight, std=0.5)
    block.dense_dispatch_rows = 0  # the grouped dispatch even for few tokens
    return block, torch.randn(2, tokens, 128, dtype=torch.bfloat16)


def test_switch_is_on_by_default_with_the_config_by_rows_and_names_a_config() -> None:
    block, _ = _block(8)
    assert block.experts.fused_gemm is True and block.experts.fused_gemm_config is None
    assert config_for_rows(128) == SMALL_CONFIG and config_for_rows(8192) == LARGE_CONFIG
    assert {SMALL_CONFIG, LARGE_CONFIG} <= set(CONFIGS)
    set_fused_gemm(block, False, "64x64x64-w4-s4")
    assert block.experts.fused_gemm is False and block.experts.fused_gemm_config == "64x64x64-w4-s4"
    with pytest.raises(ValueError, match="unknown fused GEMM config"):
        set_fused_gemm(block, True, "256x256")


def test_a_fused_gemm_that_cannot_run_here_falls_back_to_pytorch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's wiring, on CPU: the kernel is offered the token rows in place with the expert
    order's index; when it fails to launch the layer warns once and computes eagerly."""
    monkeypatch.setattr(fused, "_loaded", set())
    monkeypatch.setattr(fused, "_failed", set())
    monkeypatch.setattr(fused_gemm, "use_triton", lambda key, *t, numel: (*key, t[0].device) not in fused._failed)
    calls = []

    def broken(x: torch.Tensor, index: torch.Tensor, offs: torch.Tensor, *rest: object) -> torch.Tensor:
        calls.append((x.shape, index.shape, offs.shape))
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(fused_gemm, "_gate_up_silu_triton", broken)
    block, x = _block(9)
    if block.experts.resolve_impl(x) != "grouped_mm":
        pytest.skip("torch._grouped_mm does not run on this CPU")
    with torch.no_grad():
        set_fused_gemm(block, False)
        eager = block(x)[0]
        set_fused_gemm(block, True)
        with pytest.warns(RuntimeWarning, match="gate_up_silu cannot run"):
            first = block(x)[0]
        again = block(x)[0]
    assert torch.equal(first, eager) and torch.equal(again, eager)
    assert calls == [((18, 128), (36,), (16,))]  # tried once, on the 18 token rows for the 36 assignments


@needs_cuda
def test_compiled_kernel_matches_the_loop_in_bf16_for_every_config() -> None:
    pytest.importorskip("triton")
    sizes = [0, 1, 300, 5, 0, 64, 128, 200, 7, 0, 33, 90, 1, 2, 250, 0]  # 16 experts, some empty
    x, index, offs, w, scale = (t.cuda() for t in groups(sizes, 600, 256, 384, torch.bfloat16))
    for name, s in [(name, scale) for name in CONFIGS] + [(SMALL_CONFIG, None)]:  # each compiles a kernel
        got = fused_gemm._gate_up_silu_triton(x, index, offs, w, s, CONFIGS[name])
        want = loop_gate_up(x, index, offs, w, s)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


def _ran_fused(device: torch.device) -> bool:
    return any(v[0] == "gate_up_silu" and v[-1] == device for v in fused._loaded)


@needs_cuda
def test_block_with_fused_gemm_matches_the_block_without(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_loaded", set())
    monkeypatch.setattr(fused, "EAGER_MIN_ELEMENTS", 0)  # small test sizes take the Triton kernels too
    block, x = _block(700)
    block, x = block.cuda(), x.cuda()
    with torch.no_grad():
        set_fused_gemm(block, False)
        eager_out, eager_stats = block(x)
        set_fused_gemm(block, True)
        fused_out, fused_stats = block(x)
    assert _ran_fused(x.device)
    torch.testing.assert_close(fused_out.float(), eager_out.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(fused_stats.counts, eager_stats.counts)
    fused._loaded.clear()
    block(x.clone().requires_grad_())[0].float().sum().backward()  # with a gradient: the eager path
    assert not _ran_fused(x.device) and block.experts.w_gate_up.grad is not None


@needs_cuda
def test_block_with_fused_gemm_replays_from_a_cuda_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "_loaded", set())
    block, x = _block(400)
    block, x = block.cuda(), x.cuda()
    set_fused_gemm(block, True)
    with torch.no_grad():
        graph, (static_out, static_stats) = capture_graph(lambda: block(x), x.device)
        assert _ran_fused(x.device)  # the warm-up loaded the kernel, so the capture took it
        x.copy_(torch.randn_like(x))
        graph.replay()
        set_fused_gemm(block, False)
        out, stats = block(x)
    torch.testing.assert_close(static_out.float(), out.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(static_stats.counts, stats.counts)
