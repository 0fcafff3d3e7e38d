"""Checkpoint conversion: each test writes a checkpoint from a source model of its own and
compares the loaded encoder's outputs with that source model. Tiny sizes: width 64, depth 2,
2 heads, patch 8, 32 px (4x4 patches)."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import LayerNorm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.vision.checkpoints import (
    convert_checkpoint,
    convert_state_dict,
    detect_layout,
    infer_encoder_config,
    load_pretrained_encoder,
    read_checkpoint,
)
from lineinspect.vision.encoder import EncoderConfig, VisionEncoder

WIDTH, DEPTH, HEADS, PATCH, IMG = 64, 2, 2, 8, 32
BASE = EncoderConfig("test", IMG, PATCH, WIDTH, DEPTH, HEADS, feature_layers=(0, 1))


# --------------------------------------------------------------------------- reference CLIP tower
# An independent, minimal re-statement of CLIP's visual tower (sequence-first, nn.MultiheadAttention),
# written from its published structure; it shares no code with timm or the converter.


class RefQuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class RefLayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RefResBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: type[nn.Module], layer_scale: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act(), c_proj=nn.Linear(4 * width, width))
        )
        self.ls_1 = RefLayerScale(width) if layer_scale else nn.Identity()
        self.ls_2 = RefLayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, B, C)
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class RefTransformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, act: type[nn.Module], layer_scale: bool) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[RefResBlock(width, heads, act, layer_scale) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class RefVisualTower(nn.Module):
    def __init__(self, act: type[nn.Module], layer_scale: bool = False, width: int = WIDTH) -> None:
        super().__init__()
        grid = IMG // PATCH
        self.conv1 = nn.Conv2d(3, width, PATCH, stride=PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, DEPTH, HEADS, act, layer_scale)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 16))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + N, C): every token through ln_post (CLIP itself keeps only [:, 0])."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (norm weights near 1) so a swapped or dropped key changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_scale = p.ndim == 1 and name.endswith(("weight", "gamma"))
            p.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)
    return model.eval()


def images(size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


TEXT_TOWER = {  # a few keys of CLIP's text tower; note the bare names collide with the visual ones
    "token_embedding.weight": torch.randn(10, 32),
    "positional_embedding": torch.randn(8, 32),
    "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32),
    "ln_final.weight": torch.ones(32),
    "text_projection": torch.randn(32, 16),
    "logit_scale": torch.tensor(4.6),
}


def clip_full_model(tower: RefVisualTower, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {f"visual.{k}": v.detach().clone() for k, v in tower.state_dict().items()}
    sd.update({k: v.clone() for k, v in TEXT_TOWER.items()})
    return {prefix + k: v for k, v in sd.items()}


def timm_vit(seed: int, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=IMG,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        num_classes=10,
        **kwargs,
    )
    return randomise(vit, seed)


def assert_tokens_match(encoder: VisionEncoder, tower: RefVisualTower, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = tower.tokens(x)
        out = encoder(x)
    torch.testing.assert_close(out.cls, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patches, ref[:, 1:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"pre_norm": True, "init_values": 0.1, "norm_layer": partial(LayerNorm, eps=1e-5)}],
    ids=["plain", "clip-style-layer-scale"],
)
def test_timm_checkpoint_matches_source(tmp_path: Path, suffix: str, kwargs: dict) -> None:
    source = timm_vit(1, **kwargs)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), path)
    else:
        torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)

    encoder = load_pretrained_encoder(path, base=BASE)

    assert encoder.config.pre_norm == bool(kwargs) and (encoder.config.init_values is not None) == bool(
        kwargs
    )
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.vit.forward_features(x), source.forward_features(x), atol=1e-5, rtol=1e-5
        )


def test_timm_conversion_reports_dropped_head_and_is_pure() -> None:
    source = timm_vit(2)
    sd = source.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    converted = convert_checkpoint(sd, VisionEncoder(BASE))
    assert converted.layout == "timm"
    assert sorted(converted.dropped) == ["head.bias", "head.weight"]
    assert all(k.startswith("vit.") for k in converted.state_dict)
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)


def test_infer_config_without_base_reads_the_architecture() -> None:
    config = infer_encoder_config(timm_vit(3, mlp_ratio=2.0).state_dict())
    assert (config.embed_dim, config.depth, config.patch_size, config.img_size) == (WIDTH, DEPTH, PATCH, IMG)
    assert config.num_heads == WIDTH // 64 and config.mlp_ratio == 2.0
    assert config.feature_layers == (0, 1) and config.act == "gelu" and not config.pre_norm
    assert config.norm_eps == 1e-6 and config.init_values is None


@pytest.mark.parametrize("depth,layers", [(24, (7, 15, 23)), (12, (3, 7, 11)), (4, (0, 2, 3)), (1, (0,))])
def test_feature_layers_spread_over_depth(depth: int, layers: tuple[int, ...]) -> None:
    sd = {
        "patch_embed.proj.weight": torch.zeros(WIDTH, 3, PATCH, PATCH),
        "pos_embed": torch.zeros(1, 17, WIDTH),
    }
    sd.update({f"blocks.{i}.mlp.fc1.weight": torch.zeros(4 * WIDTH, WIDTH) for i in range(depth)})
    assert infer_encoder_config(sd, "timm").feature_layers == layers


# --------------------------------------------------------------------------- OpenAI CLIP / OpenCLIP


def test_openai_clip_full_model_matches_reference(tmp_path: Path) -> None:
    tower = randomise(RefVisualTower(RefQuickGELU), seed=4)
    path = tmp_path / "clip.safetensors"
    save_file(clip_full_model(tower), path)

    encoder = load_pretrained_encoder(path, base=BASE)

    assert detect_layout(read_checkpoint(path)) == "openai_clip"
    assert encoder.config.act == "quick_gelu" and encoder.config.pre_norm and encoder.config.norm_eps == 1e-5
    assert_tokens_match(encoder, tower, images())
    dropped = convert_checkpoint(read_checkpoint(path), encoder).dropped
    assert set(dropped) == set(TEXT_TOWER) | {"visual.proj"}


def test_bare_openai_visual_tower_loads() -> None:
    tower = randomise(RefVisualTower(RefQuickGELU), seed=5)
    sd = tower.state_dict()
    assert detect_layout(sd) == "openai_clip"
    encoder = VisionEncoder(infer_encoder_config(sd, "openai_clip", BASE))
    encoder.load_state_dict(convert_state_dict(sd, encoder), strict=True)
    assert_tokens_match(encoder.eval(), tower, images())


@pytest.mark.parametrize("layer_scale", [False, True], ids=["plain", "layer-scale"])
def test_open_clip_wrapped_checkpoint_matches_reference(tmp_path: Path, layer_scale: bool) -> None:
    tower = randomise(RefVisualTower(nn.GELU, layer_scale=layer_scale), seed=6)
    path = tmp_path / "open_clip.pt"
    torch.save({"epoch": 3, "state_dict": clip_full_model(tower, prefix="module.")}, path)

    encoder = load_pretrained_encoder(path, base=BASE)

    assert detect_layout(read_checkpoint(path)) == "open_clip"
    assert encoder.config.act == "gelu" and (encoder.config.init_values is not None) == layer_scale
    assert_tokens_match(encoder, tower, images())


def test_activation_override_changes_the_model(tmp_path: Path) -> None:
    """The activation is not in the weights: a wrong one gives different outputs, `act=` fixes it."""
    tower = randomise(RefVisualTower(nn.GELU), seed=7)
    path = tmp_path / "gelu_clip.safetensors"
    save_file(clip_full_model(tower), path)  # no OpenCLIP markers: detected as OpenAI, QuickGELU
    x = images()
    guessed = load_pretrained_encoder(path, base=BASE)
    with torch.no_grad():
        assert not torch.allclose(guessed(x).cls, tower.tokens(x)[:, 0], atol=1e-3)
    assert_tokens_match(load_pretrained_encoder(path, base=BASE, act="gelu"), tower, x)


@pytest.mark.parametrize("prefix", ["", "encoder."], ids=["encoder", "inside-defect-model"])
def test_lineinspect_checkpoint_round_trips(tmp_path: Path, prefix: str) -> None:
    encoder = randomise(VisionEncoder(BASE), seed=8)
    sd = {prefix + k: v for k, v in encoder.state_dict().items()}
    if prefix:
        sd["head.weight"] = torch.randn(3, WIDTH)  # a defect head next to the encoder
    path = tmp_path / "model.safetensors"
    save_file(sd, path)
    loaded = load_pretrained_encoder(path, base=BASE)
    assert detect_layout(sd) == "lineinspect"
    assert convert_checkpoint(sd, loaded).dropped == (["head.weight"] if prefix else [])
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).patches, encoder(x).patches, atol=0, rtol=0)


# --------------------------------------------------------------------------- position embedding


def test_position_embedding_resampled_to_larger_image(tmp_path: Path) -> None:
    tower = randomise(RefVisualTower(RefQuickGELU), seed=9)
    path = tmp_path / "clip32.safetensors"
    save_file(clip_full_model(tower), path)

    encoder = load_pretrained_encoder(
        path, base=EncoderConfig("test48", 48, PATCH, WIDTH, DEPTH, HEADS, (0, 1))
    )

    pos = encoder.vit.pos_embed.detach()
    assert pos.shape == (1, 1 + 6 * 6, WIDTH)
    torch.testing.assert_close(pos[0, 0], tower.positional_embedding.detach()[0], atol=0, rtol=0)
    out = encoder(images(48))
    assert out.patches.shape == (2, 36, WIDTH) and out.grid == (6, 6) and torch.isfinite(out.patches).all()


# --------------------------------------------------------------------------- errors


def test_wrong_width_names_layout_and_shapes() -> None:
    tower = randomise(RefVisualTower(RefQuickGELU, width=96), seed=10)
    with pytest.raises(LineInspectError) as err:
        convert_state_dict(clip_full_model(tower), VisionEncoder(BASE), source="wide.safetensors")
    msg = str(err.value)
    assert "wide.safetensors" in msg and "openai_clip" in msg
    assert "vit.cls_token checkpoint (1, 1, 96) vs encoder (1, 1, 64)" in msg


def test_base_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.safetensors"
    save_file(timm_vit(11).state_dict(), path)
    with pytest.raises(LineInspectError, match=r"deep\.safetensors: timm checkpoint has depth 2 \(base 4\)"):
        load_pretrained_encoder(path, base=EncoderConfig("test", IMG, PATCH, WIDTH, 4, HEADS, (1, 3)))


def test_missing_blocks_are_listed() -> None:
    sd = {k: v for k, v in timm_vit(12).state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(LineInspectError, match=r"timm checkpoint.*missing: vit\.blocks\.1\.norm1\.weight"):
        convert_state_dict(sd, VisionEncoder(BASE))


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(timm_vit(13).state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(LineInspectError, match=r"cut\.safetensors: unreadable or truncated safetensors"):
        load_pretrained_encoder(path, base=BASE)


def test_truncated_torch_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    torch.save(timm_vit(14).state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(LineInspectError, match=r"cut\.pth: unreadable or truncated torch file"):
        load_pretrained_encoder(path)


class _Payload:
    """Unpickling this would create `marker`: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the hostile file's protocol
def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:  # a plain pickle, as torch.load would read a legacy file
        pickle.dump({"patch_embed.proj.weight": torch.zeros(1), "payload": _Payload(marker)}, f)
    torch.save({"state_dict": timm_vit(15).state_dict(), "payload": _Payload(marker)}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(LineInspectError, match=rf"{p.name}: refused to load"):
            load_pretrained_encoder(p)
    assert not marker.exists()


def test_missing_file_unknown_suffix_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(LineInspectError, match=r"nope\.safetensors: no such checkpoint file"):
        load_pretrained_encoder(tmp_path / "nope.safetensors")
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(LineInspectError, match=r"weights\.npz: unknown checkpoint suffix"):
        load_pretrained_encoder(odd)
    resnet = tmp_path / "resnet.safetensors"
    save_file({"conv_stem.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, resnet)
    with pytest.raises(LineInspectError, match=r"resnet\.safetensors: unknown checkpoint layout.*conv_stem"):
        load_pretrained_encoder(resnet)
