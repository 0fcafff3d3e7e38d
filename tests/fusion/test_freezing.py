"""Explicit freezing: freeze all, unfreeze named parts, counts."""

from __future__ import annotations

import logging

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.fusion.freezing import freeze, log_parameter_counts, parameter_counts, unfreeze
from lineinspect.moe_lm.config import preset
from lineinspect.moe_lm.decoder import MoEDecoder


def test_freeze_then_unfreeze_cross_attention(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = MoEDecoder(preset("tiny"))
    total = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == (total, total)
    freeze(model)
    assert parameter_counts(model).trainable == 0
    names = unfreeze(model, ["*.xattn.*"])
    xattn = sum(p.numel() for b in model.blocks for p in b.xattn.parameters())
    assert names and all(".xattn." in n for n in names)
    with caplog.at_level(logging.INFO):
        counts = log_parameter_counts(model, "decoder")
    assert counts == (xattn, total)
    assert "decoder" in caplog.text and f"{xattn:,}" in caplog.text
    unfreeze(model, ["blocks.0.moe"])  # a module-path prefix
    moe0 = sum(p.numel() for p in model.blocks[0].moe.parameters())
    assert parameter_counts(model).trainable == xattn + moe0
    idx = torch.randint(0, 512, (1, 4))
    model(idx, targets=idx, image_tokens=torch.randn(1, 3, 64)).loss.backward()
    assert model.tok_emb.weight.grad is None and model.blocks[1].xattn.gate_scale.grad is not None


def test_unknown_name_is_an_error() -> None:
    model = MoEDecoder(preset("tiny"))
    with pytest.raises(LineInspectError, match="xatn"):
        unfreeze(model, ["blocks.0.xatn"])
