"""CPU threading for tiny tensors.

Work on 8x8 images or 2-D toy points is too small to gain from intra-op
threads, and on a shared 2-core machine OpenMP workers spin-wait: 300 classifier
steps took 9 s on one thread and 87 s on two under load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: leave as is), restoring the caller's setting."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
