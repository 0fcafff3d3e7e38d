"""single_threaded runs torch on the calling thread alone and always restores the setting."""

from __future__ import annotations

import threading

import pytest
import torch

from lineinspect.vision.cpu_threads import single_threaded, start_single_threaded


def test_single_threaded_restores_the_thread_count_even_after_an_error() -> None:
    before = torch.get_num_threads()
    with single_threaded():
        assert torch.get_num_threads() == 1
        assert torch.ones(100_000).sum().item() == 100_000
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), single_threaded():
        raise RuntimeError("load failed")
    assert torch.get_num_threads() == before


def test_a_single_threaded_thread_keeps_one_thread_and_the_process_keeps_its_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    done = threading.Event()

    def work() -> None:
        torch.ones(100_000).sum()
        seen.append(torch.get_num_threads())
        done.set()

    thread = start_single_threaded(work, name="side")
    assert done.wait(10) and seen == [1]
    thread.join(10)
    assert torch.get_num_threads() == before
