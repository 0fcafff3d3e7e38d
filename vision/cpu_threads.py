"""Keep torch's CPU work in one OpenMP team per process.

libgomp (the OpenMP runtime of torch's CPU wheels) counts the threads of every team in the
process. Once they outnumber the CPU cores, which a second thread running one parallel torch op
is enough for on a 2-core machine, every team stops spin-waiting between parallel regions and
sleeps instead: a `tiny` model's batch-1 call went from 22 to 65-75 ms, whichever thread made it
(`bench/RESULTS.md`). The server runs its model on the batcher's worker thread only; work that has
to happen on another thread first (loading weights in the main thread) runs under
`single_threaded`, which starts no team, and a long-lived thread of other torch work (the report
writer's decoding) is started with `start_single_threaded`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch CPU ops in this block run on the calling thread alone (no OpenMP team)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def start_single_threaded(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread whose torch CPU ops run on it alone for its whole life; threads that
    start torch work later still get the process's thread count."""
    n = torch.get_num_threads()
    ready = threading.Event()

    def body() -> None:
        torch.get_num_threads()  # torch sets up this thread's threading once, from the process default ...
        torch.set_num_threads(1)  # ... then this thread's OpenMP setting (and for a moment the default)
        ready.set()
        target()

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    ready.wait()
    torch.set_num_threads(n)  # the process default back; the new thread keeps its own
    return thread
