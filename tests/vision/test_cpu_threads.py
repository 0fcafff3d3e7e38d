"""single_threaded runs torch on the calling thread alone and always restores the setting."""

from __future__ import annotations

import pytest
import torch

from lineinspect.vision.cpu_threads import single_threaded


def test_single_threaded_restores_the_thread_count_even_after_an_error() -> None:
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
        assert torch.ones(100_000).sum().item() == 100_000
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), single_threaded():
        raise RuntimeError("load failed")
    assert torch.get_num_threads() == before
