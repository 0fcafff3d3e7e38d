"""Unbounded peaks (memory bank, novelty) as image scores: order kept far in the tail, and models
calibrated before the rational squash keep the sigmoid their thresholds were set with."""

from __future__ import annotations

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.vision.inspector import Calibration, squash_peak


def test_two_sigma_is_even_odds_and_the_order_survives_far_in_the_tail() -> None:
    z = torch.tensor([-5.0, 0.0, 2.0, 20.0, 40.0, 1e3, 1e5])
    rational = squash_peak(z)
    assert rational[2] == 0.5
    assert bool((rational.diff() > 0).all()) and bool(((rational > 0) & (rational < 1)).all())
    sigmoid = squash_peak(z, "sigmoid")
    assert sigmoid[2] == 0.5 and int((sigmoid == 1.0).sum()) >= 3  # what tied whole test sets


def test_new_calibrations_squash_rationally_and_old_files_keep_the_sigmoid() -> None:
    assert Calibration().peak_squash == "rational"
    assert Calibration.from_dict(Calibration().to_dict()).peak_squash == "rational"
    old = Calibration().to_dict()
    del old["peak_squash"]  # written before the field existed
    assert Calibration.from_dict(old).peak_squash == "sigmoid"


def test_an_unknown_squash_is_refused() -> None:
    with pytest.raises(LineInspectError, match="unknown peak squash"):
        squash_peak(torch.zeros(2), "tanh")
