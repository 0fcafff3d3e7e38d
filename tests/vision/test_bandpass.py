"""Band-pass features: a soft dent stands out in its band, whatever the lighting."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.vision.bandpass import BANDPASS_CHANNELS, bandpass_features, binomial_kernel, blur_matrix
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.self_similarity import self_similarity_map


def _brushed(size: int = 128, dent: bool = False) -> torch.Tensor:
    """Horizontal brushing grain under a lighting gradient, optionally a 20 px dent shading pair."""
    rng = np.random.default_rng(0)
    grain = np.repeat(rng.normal(0, 0.04, (size, 1)), size, 1) + rng.normal(0, 0.01, (size, size))
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.5 + 0.1 * xx + grain
    if dent:
        r2 = ((yy - 0.6) ** 2 + (xx - 0.3) ** 2) / 0.006
        img += 0.12 * np.exp(-r2) * np.sign(xx - 0.3)  # light on one side, dark on the other
    return torch.tensor(img, dtype=torch.float32).expand(1, 3, size, size).clone()


def test_shape_and_invariance_to_gain_and_offset() -> None:
    img = _brushed()
    a = bandpass_features(img, (16, 16))
    b = bandpass_features(img * 3.0 - 1.0, (16, 16))  # another exposure and normalisation
    assert a.shape == (1, BANDPASS_CHANNELS, 16, 16) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-3)


def test_a_faint_dent_is_the_most_novel_location() -> None:
    feats = bandpass_features(torch.cat([_brushed(dent=True), _brushed()]), (16, 16))
    novelty = self_similarity_map(feats)
    peak = int(novelty[0, 0].flatten().argmax())
    row, col = divmod(peak, 16)
    assert abs(row - 0.6 * 16) <= 2 and abs(col - 0.3 * 16) <= 2  # at the dent
    assert float(novelty[0].max()) > 1.5 * float(novelty[1].max())  # and not on the clean part


def test_head_with_and_without_bands_and_old_configs_load_without() -> None:
    for bandpass in (True, False):
        torch.manual_seed(0)
        model = DefectModel(DefectModelConfig(preset("tiny", img_size=64),
                                              HeadConfig(num_classes=2, bandpass=bandpass), memory_bank_size=8))
        out = model.eval()(torch.rand(2, 3, 64, 64))
        assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(out.image_prob).all()
    old = HeadConfig(num_classes=2).to_dict()
    del old["bandpass"]  # a model directory written before band-pass features existed
    assert HeadConfig.from_dict(old).bandpass is False


def test_the_kernel_moves_with_the_model_but_is_not_saved() -> None:
    model = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig(num_classes=0), memory_bank_size=8))
    assert not any("bandpass" in k for k in model.state_dict())  # model directories stay as they were
    assert model.to(torch.float64).head.bandpass.kernel.dtype == torch.float64


def test_blur_matrices_equal_the_padded_convolution() -> None:
    """The banded matrices (the CUDA path) blur as the padded 5-tap convolutions do, with
    reflected edges and, below 3 px, replicated ones."""
    kernel = binomial_kernel()
    for h, w in ((56, 56), (7, 9), (2, 2), (3, 5)):
        x = torch.randn(2, 1, h, w)
        reflect = min(h, w) > 2
        padded = F.pad(x, (2, 2, 2, 2), mode="reflect" if reflect else "replicate")
        direct = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, 5)), kernel.view(1, 1, 5, 1))
        device = torch.device("cpu")
        by_matrices = blur_matrix(h, reflect, device) @ x @ blur_matrix(w, reflect, device).T
        assert torch.allclose(by_matrices, direct, atol=1e-6)
