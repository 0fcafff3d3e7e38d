"""Decoder config: presets, validation, dict round trip."""

from __future__ import annotations

import pytest

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.config import PRESETS, DecoderConfig, preset


def test_presets() -> None:
    l14 = preset("l14")
    assert (l14.width, l14.n_routed_experts, l14.expert_hidden, l14.top_k, l14.n_shared_experts) == (
        1024, 16, 2048, 2, 1)
    assert l14.cross_attn_layers == (2, 5, 8, 11)
    assert preset("tiny").cross_attn_layers == (0, 1)
    assert preset("tiny", cross_attn_every=0).cross_attn_layers == ()
    assert preset("tiny").balance == "aux_loss" and preset("tiny").capacity_factor is None


@pytest.mark.parametrize("name", list(PRESETS))
def test_dict_round_trip(name: str) -> None:
    cfg = preset(name)
    assert DecoderConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"width": 65}, "width"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"top_k": 17}, "top_k"),
        ({"balance": "loss"}, "balance"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"expert_dropout": 1.0}, "expert_dropout"),
        ({"expert_impl": "loop"}, "expert_impl"),
        ({"gate": "scalar"}, "gate"),
        ({"cross_attn_every": -1}, "cross_attn_every"),
    ],
)
def test_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(LineInspectError, match=field):
        preset("tiny", **overrides)


def test_unknown_preset_and_fields() -> None:
    with pytest.raises(LineInspectError, match="tiny"):
        preset("huge")
    with pytest.raises(LineInspectError, match="unknown fields"):
        DecoderConfig.from_dict({**preset("tiny").to_dict(), "n_experts": 4})
