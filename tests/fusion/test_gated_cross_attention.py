"""Dynamic-gated cross-attention: exactly closed at init, opens when the task needs the image."""

from __future__ import annotations

import math

import pytest
import torch

from lineinspect.fusion.gated_cross_attention import GatedCrossAttention
from lineinspect.fusion.resampler import Resampler
from lineinspect.fusion.resampler import preset as resampler_preset
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.decoder import MoEDecoder
from lineinspect.moe_lm.losses import IGNORE_INDEX


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_decoder_output_unchanged_by_images_at_init(gate: str) -> None:
    torch.manual_seed(0)
    model = MoEDecoder(preset("tiny", gate=gate)).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    images = torch.randn(2, 5, model.config.context_dim) * 10
    with torch.no_grad():
        without = model(idx)
        with_images = model(idx, image_tokens=images)
    assert torch.equal(with_images.logits, without.logits)
    assert set(with_images.gate_stats) == {0, 1}
    assert all(float(v) == 0.0 for v in with_images.gate_stats.values())


@pytest.mark.parametrize("gate", ["head", "channel"])
def test_gate_is_dynamic_per_token(gate: str) -> None:
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 8, 4, gate=gate)
    with torch.no_grad():
        layer.gate_scale.fill_(2.0)
        torch.nn.init.normal_(layer.gate_proj.weight, std=1.0)
    x = torch.randn(2, 5, 16)
    context = layer.project_context(torch.randn(2, 3, 8))
    assert context.keys.shape == (2, 4, 3, 4)
    update, openness = layer(x, context)
    assert update.shape == x.shape and 0 < float(openness) < math.tanh(2.0)
    h = layer.norm(x)
    gate_values = torch.tanh(layer.gate_scale) * torch.sigmoid(layer.gate_proj(h))  # (B, T, G)
    assert gate_values.shape[-1] == (4 if gate == "head" else 16)
    assert gate_values.std(dim=1).min() > 0  # differs from token to token
    torch.testing.assert_close(openness, gate_values.abs().mean())


def test_gate_opens_and_loss_falls_when_the_answer_needs_the_image() -> None:
    """Toy VQA: the answer token (4 + class) is only in the image; text alone gives log 4 at best."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=16, width=32, n_heads=4, n_kv_heads=2, n_routed_experts=4,
                 expert_hidden=32, cross_attn_every=2)
    decoder = MoEDecoder(cfg)
    resampler = Resampler(resampler_preset("tiny", vision_dim=24, dim=32, n_latents=4, depth=1, n_heads=4))
    prototypes = torch.randn(4, 24)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cls = torch.randint(0, 4, (n,))
        vision = prototypes[cls][:, None, :] + 0.3 * torch.randn(n, 6, 24)  # (n, N=6, D_img)
        idx = torch.tensor([[1, 3]]).repeat(n, 1)  # <bos> <image>
        targets = torch.stack([torch.full((n,), IGNORE_INDEX), 4 + cls], dim=1)
        return vision, idx, targets

    params = list(decoder.parameters()) + list(resampler.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses, gates = [], []
    for _ in range(40):
        vision, idx, targets = batch(32)
        out = decoder(idx, targets=targets, image_tokens=resampler(vision))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss_terms["lm"].item())
        gates.append(float(out.gate_stats[1]))
    assert gates[0] == 0.0 and gates[-1] > 0.05
    assert losses[-1] < 0.25 * math.log(4) < losses[0]  # far below the text-only floor
    vision, idx, targets = batch(64)
    with torch.no_grad():
        text_only = decoder(idx, targets=targets).loss_terms["lm"]
    assert text_only > 0.8 * math.log(4)  # without the image the model cannot know the answer
