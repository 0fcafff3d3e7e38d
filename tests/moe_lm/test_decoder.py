"""Decoder: shapes and stats, KV-cache equivalence, left padding, overfit, checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.checkpoint import load_decoder, save_decoder
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.decoder import MoEDecoder
from lineinspect.moe_lm.kv_cache import KVCache
from lineinspect.moe_lm.losses import IGNORE_INDEX


def _model(**overrides) -> MoEDecoder:
    torch.manual_seed(0)
    return MoEDecoder(preset("tiny", **overrides))


def _open_gates(model: MoEDecoder) -> None:
    """Open every cross-attention gate, so the image really changes the output."""
    with torch.no_grad():
        for block in model.blocks:
            if block.xattn is not None:
                block.xattn.gate_scale.fill_(1.0)


def test_shapes_and_stats() -> None:
    model = _model()
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    images = torch.randn(2, 5, cfg.context_dim)
    out = model(idx, targets=idx, image_tokens=images)
    assert out.logits.shape == (2, 9, cfg.vocab_size) and out.hidden.shape == (2, 9, cfg.width)
    assert len(out.router_logits) == cfg.depth and out.router_logits[0].shape == (18, cfg.n_routed_experts)
    assert out.expert_counts.shape == (cfg.depth, cfg.n_routed_experts)
    assert out.expert_counts.sum(dim=1).tolist() == [18 * cfg.top_k] * cfg.depth
    assert out.overflow.shape == out.expert_counts.shape and int(out.overflow.sum()) == 0
    assert set(out.gate_stats) == set(cfg.cross_attn_layers)
    assert all(float(g) == 0.0 for g in out.gate_stats.values())  # closed at init
    assert set(out.loss_terms) == {"lm", "balance", "z"}
    expected = out.loss_terms["lm"] + cfg.aux_loss_weight * out.loss_terms["balance"] + \
        cfg.router_z_loss_weight * out.loss_terms["z"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert model.blocks[0].moe.experts.w_down.grad is not None
    assert model(idx).gate_stats == {}  # no image tokens, no gate statistics


def test_bad_inputs_raise() -> None:
    model = _model()
    with pytest.raises(LineInspectError, match="image_tokens"):
        model(torch.zeros(2, 3, dtype=torch.long), image_tokens=torch.randn(2, 4, 7))
    with pytest.raises(LineInspectError, match="image_mask"):
        model(torch.zeros(2, 3, dtype=torch.long), image_tokens=torch.randn(2, 4, 64),
              image_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(LineInspectError, match="cross_attn_every"):
        _model(cross_attn_every=0)(torch.zeros(1, 3, dtype=torch.long), image_tokens=torch.randn(1, 4, 64))
    with pytest.raises(LineInspectError, match="max_seq_len"):
        model(torch.zeros(1, model.config.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(LineInspectError, match="update_balance_biases"):
        model.update_balance_biases(torch.zeros(2, 16, dtype=torch.long))


@pytest.mark.parametrize("with_images", [False, True])
def test_cached_incremental_logits_equal_full_sequence(with_images: bool) -> None:
    model = _model().eval()
    _open_gates(model)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    images = torch.randn(2, 6, cfg.context_dim) if with_images else None
    with torch.no_grad():
        full = model(idx, image_tokens=images).logits
        cache = KVCache.allocate(cfg, 2, 12, "cpu", torch.float32)
        pieces = [model(idx[:, :5], image_tokens=images, kv_cache=cache).logits]
        for t in range(5, 12):  # images only at prefill: the cache keeps their keys and values
            pieces.append(model(idx[:, t : t + 1], kv_cache=cache).logits)
    assert cache.length == 12 and cache.n_real.tolist() == [12, 12]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    if with_images:
        assert not torch.allclose(full, model(idx).logits, atol=1e-4)  # the image matters
    with pytest.raises(LineInspectError, match="capacity"):
        model(idx[:, :1], kv_cache=cache)


def test_left_padding_is_invisible() -> None:
    model = _model().eval()
    _open_gates(model)
    cfg = model.config
    row = torch.randint(4, cfg.vocab_size, (1, 6))
    image = torch.randn(1, 4, cfg.context_dim)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        alone = model(row, image_tokens=image).logits
        both = model(padded, image_tokens=image, attention_mask=mask).logits
    torch.testing.assert_close(both[:, 3:], alone, rtol=1e-4, atol=1e-5)


def test_row_without_image_reads_nothing() -> None:
    model = _model().eval()
    _open_gates(model)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    images = torch.randn(2, 4, cfg.context_dim)
    image_mask = torch.tensor([[True, True, False, False], [False] * 4])
    with torch.no_grad():
        out = model(idx, image_tokens=images, image_mask=image_mask)
        text_only = model(idx).logits
        first_alone = model(idx[:1], image_tokens=images[:1, :2]).logits
    # equal up to matmul blocking: row 0's tokens change how the expert groups are batched
    torch.testing.assert_close(out.logits[1], text_only[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits[:1], first_alone, rtol=1e-4, atol=1e-5)
    assert all(float(g) > 0 for g in out.gate_stats.values())


def test_overfits_a_batch_with_image_tokens() -> None:
    model = _model(capacity_factor=1.25).train()
    cfg = model.config
    torch.manual_seed(1)
    idx = torch.randint(4, cfg.vocab_size, (4, 12))
    images = torch.randn(4, 8, cfg.context_dim)
    targets = torch.cat([idx[:, 1:], torch.full((4, 1), IGNORE_INDEX)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(idx, targets=targets, image_tokens=images)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss_terms["lm"].item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(torch.isfinite(torch.tensor(losses)))


def test_bias_balancing_mode() -> None:
    model = _model(balance="bias").train()
    idx = torch.randint(0, model.config.vocab_size, (2, 8))
    out = model(idx, targets=idx)
    # no balance term in the loss in this mode; it is still reported
    expected = out.loss_terms["lm"] + model.config.router_z_loss_weight * out.loss_terms["z"]
    torch.testing.assert_close(out.loss.detach(), expected)
    before = model.blocks[0].moe.router.balance_bias.clone()
    model.update_balance_biases(out.expert_counts)
    assert not torch.equal(model.blocks[0].moe.router.balance_bias, before)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model(balance="bias").eval()
    with torch.no_grad():
        model.blocks[0].moe.router.balance_bias.fill_(0.25)
    save_decoder(model, tmp_path / "dec")
    again = load_decoder(tmp_path / "dec")
    assert again.config == model.config
    assert again.lm_head.weight is again.tok_emb.weight
    idx = torch.randint(0, model.config.vocab_size, (1, 7))
    torch.testing.assert_close(again.eval()(idx).logits, model(idx).logits, rtol=0, atol=0)
    with pytest.raises(LineInspectError, match="missing"):
        load_decoder(tmp_path / "nowhere")
