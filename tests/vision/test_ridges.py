"""Ridge features: a faint one-pixel scratch across brushing grain is where the lines peak."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.ridges import (
    RIDGE_CHANNELS,
    channel_std,
    correlate_fft,
    ridge_features,
    ridge_kernels,
    ridge_peaks,
)


def _brushed(size: int = 128, scratch: bool = False, seed: int = 0) -> torch.Tensor:
    """Vertical brushing grain (stronger than the scratch) and noise, optionally a faint 1 px
    scratch at 30 degrees from the horizontal through the centre of the lower-left quarter."""
    rng = np.random.default_rng(seed)
    img = 0.5 + np.repeat(rng.normal(0, 0.05, (1, size)), size, 0) + rng.normal(0, 0.01, (size, size))
    if scratch:
        cy, cx = 0.75 * size, 0.25 * size
        for t in np.linspace(-0.15 * size, 0.15 * size, 4 * size):
            y, x = int(round(cy + t * math.sin(math.radians(30)))), int(round(cx + t * math.cos(math.radians(30))))
            img[y, x] += 0.04
    return torch.tensor(img, dtype=torch.float32).expand(1, 3, size, size).clone()


def test_kernels_are_zero_mean_line_filters() -> None:
    k = ridge_kernels()
    assert k.shape[:2] == (RIDGE_CHANNELS, 1)
    assert torch.allclose(k.sum((1, 2, 3)), torch.zeros(RIDGE_CHANNELS), atol=1e-6)  # flat regions give 0


def test_a_faint_scratch_across_the_grain_is_the_strongest_line() -> None:
    kernels = ridge_kernels()
    scratched = ridge_peaks(ridge_features(_brushed(scratch=True), kernels), (16, 16))[0, 0]
    clean = ridge_peaks(ridge_features(_brushed(), kernels), (16, 16))[0, 0]
    row, col = divmod(int(scratched.flatten().argmax()), 16)
    assert abs(row - 12) <= 2 and abs(col - 4) <= 3  # on the scratch
    assert float(scratched.max()) > 1.5 * float(clean.max())  # grain alone never looks like that


def test_responses_ignore_exposure() -> None:
    img = _brushed(scratch=True)
    kernels = ridge_kernels()
    assert torch.allclose(ridge_features(img, kernels), ridge_features(img * 2.5 - 0.7, kernels), atol=1e-3)


def test_fourier_correlation_equals_the_direct_convolution() -> None:
    torch.manual_seed(0)
    kernels = ridge_kernels()
    for h, w in ((78, 78), (45, 61)):  # odd and uneven sizes: the valid region must line up exactly
        x = torch.rand(3, 1, h, w)
        direct = F.conv2d(x, kernels)
        assert correlate_fft(x, kernels).shape == direct.shape
        assert torch.allclose(correlate_fft(x, kernels), direct, atol=1e-5)


def test_head_with_and_without_ridges_and_old_configs_load_without() -> None:
    for ridges in (True, False):
        torch.manual_seed(0)
        model = DefectModel(DefectModelConfig(preset("tiny", img_size=64),
                                              HeadConfig(num_classes=2, ridges=ridges), memory_bank_size=8))
        out = model.eval()(torch.rand(2, 3, 64, 64))
        assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(out.image_prob).all()
        assert not any("ridges" in k for k in model.state_dict())  # kernels are not weights
    old = HeadConfig(num_classes=2).to_dict()
    del old["ridges"], old["class_region"]  # a model directory written before either existed
    restored = HeadConfig.from_dict(old)
    assert restored.ridges is False and restored.class_region == "soft"


def test_channel_std_equals_torch_std() -> None:
    x = torch.randn(2, 8, 30, 40, generator=torch.Generator().manual_seed(0)) * 3 + 5
    assert torch.allclose(channel_std(x), x.flatten(2).std(2)[..., None, None], rtol=1e-5)
