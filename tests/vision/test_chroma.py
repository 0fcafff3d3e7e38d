"""Colour deviation marks a change of hue, not of brightness, against the part's own colour."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.vision.chroma import CHROMA_CHANNELS, chroma_deviation
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.preprocess import MEAN, STD

MEAN_T, STD_T = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


def magnitude(images: torch.Tensor) -> torch.Tensor:
    """The deviation's magnitude per 1/8 cell of (B,3,64,64) images in [0, 1], normalised as the model's input."""
    out = chroma_deviation((images - MEAN_T) / STD_T, (8, 8), (torch.tensor(MEAN), torch.tensor(STD)))
    assert out.shape == (len(images), CHROMA_CHANNELS, 8, 8) and out.dtype == torch.float32
    return out[:, 2]


def test_a_stain_of_another_hue_stands_out_where_it_is_and_a_dark_spot_does_not() -> None:
    torch.manual_seed(0)
    grey = 0.6 + 0.02 * torch.randn(1, 3, 64, 64)  # sensor noise on an evenly grey part
    rust, dark = grey.clone(), grey.clone()
    rust[0, 0, 40:56, 8:24] += 0.06  # redder and less blue, same brightness on average
    rust[0, 2, 40:56, 8:24] -= 0.06
    dark[0, :, 40:56, 8:24] -= 0.1  # a brightness change only (a dent's shading)
    plain, stained, shaded = magnitude(grey)[0], magnitude(rust)[0], magnitude(dark)[0]
    assert float(stained[5:7, 1:3].min()) > 2 * float(plain.max())
    assert float(stained[0:4, 4:8].max()) <= float(plain.max()) + 0.5  # away from the stain: as before
    torch.testing.assert_close(shaded, plain, atol=0.15, rtol=0)  # ratios of a darker patch: a little noisier


def test_the_parts_own_tint_is_normal() -> None:
    torch.manual_seed(1)
    grey = 0.5 + 0.02 * torch.randn(1, 3, 64, 64)
    tinted = grey * torch.tensor([1.2, 1.0, 0.8]).view(1, 3, 1, 1)  # a brass-coloured part, evenly
    assert float(magnitude(tinted).max()) < 2.0  # asinh of a couple of spreads at most: nothing stands out


def test_shading_on_a_tinted_part_is_not_a_colour_change() -> None:
    torch.manual_seed(2)
    brass = (0.55 + 0.02 * torch.randn(1, 3, 64, 64)) * torch.tensor([1.2, 1.0, 0.7]).view(1, 3, 1, 1)
    dented = brass.clone()
    dented[0, :, 16:40, 16:40] *= 0.8  # a dent's shading darkens every channel alike
    assert float(magnitude(dented)[0, 2:5, 2:5].max()) <= float(magnitude(brass).max()) + 0.5


def test_model_directories_from_before_colour_deviation_load_without_it() -> None:
    old = {k: v for k, v in HeadConfig().to_dict().items() if k != "chroma"}
    assert HeadConfig.from_dict(old).chroma == "off"
    assert HeadConfig.from_dict({**old, "chroma": False}).chroma == "off"  # written when it was a switch
    with pytest.raises(LineInspectError, match="train it again"):  # that version measured colour differently
        HeadConfig.from_dict({**old, "chroma": True})
    assert HeadConfig.from_dict({**old, "chroma": "image"}).chroma == "image"
    with pytest.raises(LineInspectError, match="chroma"):
        HeadConfig(chroma="colour")


@pytest.mark.parametrize("mode", ["image", "pixel"])
def test_a_head_with_colour_deviation_trains_and_runs(mode: str) -> None:
    from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
    from lineinspect.vision.encoder import preset

    torch.manual_seed(0)
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(chroma=mode), memory_bank_size=8))
    plain = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(chroma="off"), memory_bank_size=8))
    images = torch.rand(2, 3, 64, 64)
    head = model.logits(images)
    (head.mask_logits.mean() + head.image_logit.mean()).backward()
    # "pixel": the colour channels widen the decoder's input; "image": one more image-level statistic
    fuse_in, stats_in = model.head.fuse8[0][0].weight.shape[1], model.head.image_out[0].weight.shape[1]
    plain_fuse_in, plain_stats_in = plain.head.fuse8[0][0].weight.shape[1], plain.head.image_out[0].weight.shape[1]
    assert (fuse_in - plain_fuse_in, stats_in - plain_stats_in) == ((3, 0) if mode == "pixel" else (0, 1))
    if mode == "pixel":  # the colour channels come last in the decoder's input, and it learns from them
        assert model.head.fuse8[0][0].weight.grad[:, -CHROMA_CHANNELS:].abs().sum() > 0
    else:  # the colour statistic comes last among the image-level ones, and reaches the score
        assert model.head.image_out[0].weight.grad[:, -1].abs().sum() > 0
    with torch.inference_mode():
        out = model.eval()(images, use_memory=False)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
