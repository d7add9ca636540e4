"""One intra-op thread for small training steps.

A step whose arithmetic is small (the digits MLP: ~0.3 M multiply-adds per step; a fused pack of
three of them ~0.9 M) is mostly per-op overhead, and torch's intra-op parallelism buys nothing on
it: alone on this 2-core machine a solo step of up to ~2.4 M multiply-adds is as fast or faster on
one thread. Where the cores are also busy with other work (``trainyard serve``: the API beside a
niced worker) a parallel op loses outright, waiting for its second thread to be scheduled: in
``trainyard serve`` an ASHA sweep of the digits MLP took 3.35 s solo and 0.85 s packed with two
threads, 2.88 s and 0.77 s with one for steps under 2 M multiply-adds (BENCHMARKS.md,
"2026-12-06 (seventh session)"). Larger steps keep the process's threads (a pack of nine digits MLPs,
~2.7 M, is 13 % faster on two). The worker passes ``TRAINYARD_TORCH_ONE_THREAD_BELOW`` to ``fit``,
``fit_fused`` and ``lr_find``; a caller of the engine that passes nothing gets torch's threads unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def step_threads(one_below: int, device: torch.device) -> Iterator[Callable[[int], None]]:
    """Yield ``use(work)``: it sets torch's intra-op threads for steps of ``work`` multiply-adds
    (rows per step x :func:`training.shapes.multiply_adds` x trials in the step): one below
    ``one_below``, else the count the process had on entry, which is restored on exit. With
    ``one_below`` 0, a device other than the CPU or a process already on one thread, ``use``
    changes nothing."""
    default = torch.get_num_threads()
    if not one_below or device.type != "cpu" or default == 1:
        yield lambda work: None
        return
    current = default

    def use(work: int) -> None:
        nonlocal current
        want = 1 if work < one_below else default
        if want != current:
            torch.set_num_threads(want)
            current = want

    try:
        yield use
    finally:
        if current != default:
            torch.set_num_threads(default)
