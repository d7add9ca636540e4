"""One intra-op thread for small steps (``training.threads``): the step's multiply-adds are
torch's own count, a small run (solo or a fused pack that shrinks) trains on one thread, a large
one on the process's threads, and the process gets its threads back afterwards."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import fit, lr_find
from training.fused import fit_fused
from training.model import build_model
from training.objectives import strip_output_activation
from training.reporting import BaseReporter
from training.shapes import multiply_adds
from training.spec import validate_spec

MLP: dict[str, Any] = {
    "seed": 0, "device": "cpu", "deterministic": True,
    "data": {"dataset": "digits", "validation_split": 0.2, "batch_size": 128, "standardize": True},
    "model": {"layers": [{"type": "dense", "units": 16, "activation": "relu"}, {"type": "dropout", "rate": 0.0},
                         {"type": "dense", "units": 10}]},
    "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"],
    "optimizer": {"name": "adam", "learning_rate": 0.003}, "epochs": 4,
}
MLP_WORK = 128 * (64 * 16 + 16 * 10)  # rows per step x the forward pass's multiply-adds per row

CONV: dict[str, Any] = copy.deepcopy(MLP) | {
    "data": {"dataset": "digits", "layout": "image", "validation_split": 0.2, "batch_size": 32},
    "model": {"layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
        {"type": "batch_norm"},
        {"type": "max_pool2d", "pool_size": 2},
        {"type": "conv2d", "filters": 6, "kernel_size": [2, 3], "strides": 1, "use_bias": False},
        {"type": "flatten"},
        {"type": "dense", "units": 24, "activation": "tanh"},
        {"type": "dense", "units": 10},
    ]},
}


@pytest.fixture()
def two_threads() -> Iterator[None]:
    """The process on two intra-op threads (what a 2-core machine's torch starts with), whatever
    the test run set before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Threads(BaseReporter):
    """The intra-op threads torch had at each epoch's end."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.seen: list[int] = []
        self.stop_at = stop_at

    def on_epoch(self, metrics: dict[str, float]) -> None:
        self.seen.append(torch.get_num_threads())
        if metrics["epoch"] == self.stop_at:
            self.stop_request = "pruned"


@pytest.mark.parametrize("spec", [MLP, CONV], ids=["mlp", "conv"])
def test_multiply_adds_are_torchs_own_count(spec: dict[str, Any]) -> None:
    job = validate_spec(spec)
    shape = (1, 8, 8) if job.data.layout == "image" else (64,)
    model = build_model(job, shape, strip_output_activation(job)).module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *shape))
    assert counter.get_total_flops() == 2 * multiply_adds(job.model, shape)  # a multiply-add is two flops


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(("one_below", "expected"), [(MLP_WORK + 1, 1), (MLP_WORK, 2), (0, 2)])
def test_a_run_whose_steps_are_small_trains_on_one_thread(one_below: int, expected: int) -> None:
    rep = Threads()
    result = fit(MLP, rep, one_thread_below=one_below)
    assert result.stop_reason == "completed"
    assert rep.seen == [expected] * MLP["epochs"]
    assert torch.get_num_threads() == 2  # the process's own again


@pytest.mark.usefixtures("two_threads")
def test_a_pack_that_shrinks_below_the_line_goes_on_on_one_thread() -> None:
    # three members: 3 x MLP_WORK per step, above the line; one is pruned after epoch 2, and the
    # two left (2 x MLP_WORK) are below it from epoch 3
    specs = [dict(MLP, seed=s) for s in (1, 2, 3)]
    reps = [Threads(stop_at=2), Threads(), Threads()]
    results = fit_fused(specs, reps, fallback=False, one_thread_below=int(2.5 * MLP_WORK))
    assert [r.info["pack"]["fused"] for r in results] == [True] * 3
    assert reps[0].seen == [2, 2]
    assert reps[1].seen == reps[2].seen == [2, 2, 1, 1]
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(("one_below", "expected"), [(MLP_WORK + 1, 1), (0, 2)])
def test_an_lr_range_test_follows_the_same_rule(one_below: int, expected: int) -> None:
    seen: list[int] = []

    def should_stop() -> bool:  # polled during the range test's steps
        seen.append(torch.get_num_threads())
        return False

    found = lr_find(MLP, steps=20, should_stop=should_stop, one_thread_below=one_below)
    assert found["lrs"] and seen and set(seen) == {expected}
    assert torch.get_num_threads() == 2
