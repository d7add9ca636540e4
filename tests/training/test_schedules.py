"""Exactness tests for training/schedules.py.

Expected values are written out by hand from the formulas in shared/docs/semantics.md (Keras 3
ExponentialDecay / PolynomialDecay / CosineDecay / CosineDecayRestarts) or taken from PyTorch's own
schedulers (StepLR, MultiStepLR, OneCycleLR) -- never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.schedules import ScheduleError, make_lr_fn, preview_schedule

REL = 1e-12


def approx(x: float) -> object:
    return pytest.approx(x, rel=REL, abs=1e-15)


def torch_lrs(lr0: float, make_sched, n: int) -> list[float]:
    """The lr torch uses for updates 0..n-1 (read before each optimizer.step())."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr0)
    sched = make_sched(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# --------------------------------------------------------------------------- constant


def test_plain_number_is_constant():
    f = make_lr_fn(0.01)
    assert [f(k) for k in (0, 1, 999, 10**7)] == [0.01] * 4


def test_constant_schedule():
    f = make_lr_fn({"schedule": "constant", "initial_learning_rate": 0.003})
    assert [f(k) for k in (0, 1, 57, 10**6)] == [approx(0.003)] * 4


# --------------------------------------------------------------------------- exponential


def test_exponential_continuous():
    f = make_lr_fn({"schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 100, "decay_rate": 0.5})
    assert f(0) == approx(0.1)
    assert f(50) == approx(0.1 * 0.5**0.5)
    assert f(99) == approx(0.1 * 0.5**0.99)
    assert f(100) == approx(0.05)
    assert f(150) == approx(0.1 * 0.5**1.5)
    assert f(1000) == approx(0.1 * 0.5**10)


def test_exponential_staircase_is_step_decay():
    f = make_lr_fn(
        {"schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 100, "decay_rate": 0.5, "staircase": True}
    )
    assert f(0) == approx(0.1)
    assert f(50) == approx(0.1)
    assert f(99) == approx(0.1)
    assert f(100) == approx(0.05)
    assert f(150) == approx(0.05)
    assert f(199) == approx(0.05)
    assert f(200) == approx(0.025)
    assert f(1050) == approx(0.1 * 0.5**10)


# --------------------------------------------------------------------------- step / multistep


def test_step_in_steps_hand_values():
    f = make_lr_fn({"schedule": "step", "initial_learning_rate": 0.1, "step_size": 3, "gamma": 0.5, "unit": "step"})
    assert [f(k) for k in range(8)] == [approx(v) for v in (0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025)]


def test_step_in_steps_matches_torch_steplr():
    n = 40
    f = make_lr_fn({"schedule": "step", "initial_learning_rate": 0.2, "step_size": 7, "gamma": 0.3, "unit": "step"})
    ref = torch_lrs(0.2, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.3), n)
    assert [f(k) for k in range(n)] == [approx(v) for v in ref]


def test_step_default_gamma_is_torch_default():
    f = make_lr_fn({"schedule": "step", "initial_learning_rate": 1.0, "step_size": 2, "unit": "step"})
    ref = torch_lrs(1.0, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2), 7)
    assert [f(k) for k in range(7)] == [approx(v) for v in ref]
    assert f(2) == approx(0.1)


def test_step_in_epochs():
    spe = 4
    f = make_lr_fn(
        {"schedule": "step", "initial_learning_rate": 0.1, "step_size": 2, "gamma": 0.1, "unit": "epoch"},
        steps_per_epoch=spe,
    )
    # epochs 0,1 -> 0.1 (steps 0..7); epochs 2,3 -> 0.01 (steps 8..15); epoch 4 -> 0.001
    ref_epoch = torch_lrs(0.1, lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1), 6)
    for step in range(24):
        assert f(step) == approx(ref_epoch[step // spe]), step
    assert f(7) == approx(0.1)
    assert f(8) == approx(0.1 * 0.1)
    assert f(16) == approx(0.1 * 0.1 * 0.1)


def test_step_in_epochs_needs_steps_per_epoch():
    with pytest.raises(ScheduleError):
        make_lr_fn({"schedule": "step", "initial_learning_rate": 0.1, "step_size": 2, "unit": "epoch"})(5)


def test_multistep_in_steps_matches_torch():
    n = 30
    f = make_lr_fn(
        {"schedule": "multistep", "initial_learning_rate": 0.5, "milestones": [3, 10, 11], "gamma": 0.2, "unit": "step"}
    )
    ref = torch_lrs(0.5, lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[3, 10, 11], gamma=0.2), n)
    assert [f(k) for k in range(n)] == [approx(v) for v in ref]
    assert f(2) == approx(0.5)
    assert f(3) == approx(0.5 * 0.2)
    assert f(10) == approx(0.5 * 0.2**2)
    assert f(11) == approx(0.5 * 0.2**3)
    assert f(1000) == approx(0.5 * 0.2**3)


def test_multistep_in_epochs():
    spe = 5
    f = make_lr_fn(
        {"schedule": "multistep", "initial_learning_rate": 0.1, "milestones": [1, 3], "unit": "epoch"},
        steps_per_epoch=spe,
    )
    assert f(0) == approx(0.1)
    assert f(4) == approx(0.1)
    assert f(5) == approx(0.1 * 0.1)  # epoch 1
    assert f(14) == approx(0.1 * 0.1)  # epoch 2
    assert f(15) == approx(0.1 * 0.1 * 0.1)  # epoch 3
    assert f(100) == approx(0.1 * 0.1 * 0.1)


def test_multistep_in_epochs_needs_steps_per_epoch():
    with pytest.raises(ScheduleError):
        make_lr_fn({"schedule": "multistep", "initial_learning_rate": 0.1, "milestones": [1], "unit": "epoch"})(5)


# --------------------------------------------------------------------------- polynomial


def test_polynomial_no_cycle_power_2():
    f = make_lr_fn(
        {"schedule": "polynomial", "initial_learning_rate": 0.1, "decay_steps": 10, "end_learning_rate": 0.01, "power": 2.0}
    )
    assert f(0) == approx(0.1)
    assert f(3) == approx((0.1 - 0.01) * (1 - 3 / 10) ** 2 + 0.01)
    assert f(5) == approx((0.1 - 0.01) * 0.5**2 + 0.01)
    assert f(10) == approx(0.01)
    assert f(25) == approx(0.01)  # clamped at decay_steps


def test_polynomial_keras_defaults():
    # Keras PolynomialDecay defaults: end_learning_rate=1e-4, power=1.0, cycle=False
    f = make_lr_fn({"schedule": "polynomial", "initial_learning_rate": 0.1, "decay_steps": 100})
    assert f(50) == approx((0.1 - 1e-4) * 0.5 + 1e-4)
    assert f(100) == approx(1e-4)
    assert f(500) == approx(1e-4)


def test_polynomial_cycle():
    f = make_lr_fn(
        {
            "schedule": "polynomial", "initial_learning_rate": 0.1, "decay_steps": 10,
            "end_learning_rate": 0.01, "power": 0.5, "cycle": True,
        }
    )
    assert f(0) == approx(0.1)  # multiplier 1 at step 0
    assert f(4) == approx(0.09 * (1 - 4 / 10) ** 0.5 + 0.01)
    assert f(10) == approx(0.01)  # ceil(10/10)=1 -> p=1
    assert f(11) == approx(0.09 * (1 - 11 / 20) ** 0.5 + 0.01)  # ceil(1.1)=2 -> decay_steps 20
    assert f(15) == approx(0.09 * (1 - 15 / 20) ** 0.5 + 0.01)
    assert f(20) == approx(0.01)
    assert f(25) == approx(0.09 * (1 - 25 / 30) ** 0.5 + 0.01)


# --------------------------------------------------------------------------- cosine


def test_cosine_alpha():
    f = make_lr_fn({"schedule": "cosine", "initial_learning_rate": 0.1, "decay_steps": 100, "alpha": 0.1})
    assert f(0) == approx(0.1)
    assert f(25) == approx(0.1 * ((1 - 0.1) * 0.5 * (1 + math.cos(math.pi * 0.25)) + 0.1))
    assert f(50) == approx(0.1 * (0.9 * 0.5 + 0.1))
    assert f(100) == approx(0.1 * 0.1)
    assert f(1000) == approx(0.1 * 0.1)  # s = min(step, decay_steps)


def test_cosine_no_alpha():
    f = make_lr_fn({"schedule": "cosine", "initial_learning_rate": 0.2, "decay_steps": 40})
    assert f(10) == approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(20) == approx(0.1)
    assert f(40) == pytest.approx(0.0, abs=1e-15)
    assert f(41) == pytest.approx(0.0, abs=1e-15)


def test_cosine_keras_warmup_target():
    # Keras CosineDecay(initial_learning_rate=0.01, decay_steps=100, warmup_target=0.1, warmup_steps=10)
    f = make_lr_fn(
        {"schedule": "cosine", "initial_learning_rate": 0.01, "decay_steps": 100,
         "warmup_target": 0.1, "warmup_steps": 10}
    )
    assert f(0) == approx(0.01)
    assert f(5) == approx((0.1 - 0.01) * 5 / 10 + 0.01)
    assert f(9) == approx((0.1 - 0.01) * 9 / 10 + 0.01)
    assert f(10) == approx(0.1)
    assert f(35) == approx(0.1 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert f(60) == approx(0.05)
    assert f(110) == pytest.approx(0.0, abs=1e-15)
    assert f(500) == pytest.approx(0.0, abs=1e-15)


def test_cosine_keras_warmup_target_with_alpha():
    # alpha is a fraction of the decay's start, i.e. of warmup_target
    f = make_lr_fn(
        {"schedule": "cosine", "initial_learning_rate": 0.001, "decay_steps": 20, "alpha": 0.2,
         "warmup_target": 0.5, "warmup_steps": 4}
    )
    assert f(2) == approx((0.5 - 0.001) * 0.5 + 0.001)
    assert f(4) == approx(0.5)
    assert f(14) == approx(0.5 * (0.8 * 0.5 + 0.2))
    assert f(24) == approx(0.5 * 0.2)
    assert f(100) == approx(0.5 * 0.2)


# --------------------------------------------------------------------------- cosine_restarts


def test_cosine_restarts_source_note_example():
    # CosineDecayRestarts(initial_learning_rate=0.01, first_decay_steps=1000), t_mul=2, m_mul=1, alpha=0
    f = make_lr_fn({"schedule": "cosine_restarts", "initial_learning_rate": 0.01, "first_decay_steps": 1000})
    assert f(0) == approx(0.01)
    assert f(250) == approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(500) == approx(0.005)
    assert f(1000) == approx(0.01)  # first restart
    assert f(2000) == approx(0.005)  # middle of the 2000-step second period
    assert f(3000) == approx(0.01)  # second restart
    assert f(5000) == approx(0.005)  # middle of the 4000-step third period


def test_cosine_restarts_t_mul_1():
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": 1.0, "first_decay_steps": 10, "t_mul": 1.0}
    )
    before = 0.5 * (1 + math.cos(math.pi * 0.9))
    for boundary in (10, 20, 30, 100):
        assert f(boundary - 1) == approx(before), boundary
        assert f(boundary) == approx(1.0), boundary
        assert f(boundary + 5) == approx(0.5), boundary


def test_cosine_restarts_t_mul_2_boundaries():
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": 1.0, "first_decay_steps": 10, "t_mul": 2.0}
    )
    # periods: [0,10) len 10, [10,30) len 20, [30,70) len 40, [70,150) len 80
    for start, length in ((0, 10), (10, 20), (30, 40), (70, 80)):
        assert f(start) == approx(1.0), start
        assert f(start + length // 2) == approx(0.5), start
        assert f(start + length - 1) == approx(0.5 * (1 + math.cos(math.pi * (length - 1) / length))), start
    assert f(150) == approx(1.0)


def test_cosine_restarts_m_mul_alpha():
    lr0, alpha, m = 0.02, 0.1, 0.5
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": lr0, "first_decay_steps": 10,
         "t_mul": 2.0, "m_mul": m, "alpha": alpha}
    )

    def ref(i: int, frac: float) -> float:
        return lr0 * ((1 - alpha) * 0.5 * m**i * (1 + math.cos(math.pi * frac)) + alpha)

    assert f(0) == approx(lr0)
    assert f(9) == approx(ref(0, 0.9))
    assert f(10) == approx(lr0 * ((1 - alpha) * 0.5 + alpha))  # m_mul**1 * full cosine
    assert f(20) == approx(ref(1, 0.5))
    assert f(29) == approx(ref(1, 19 / 20))
    assert f(30) == approx(lr0 * ((1 - alpha) * 0.25 + alpha))
    assert f(69) == approx(ref(2, 39 / 40))
    assert f(70) == approx(lr0 * ((1 - alpha) * 0.125 + alpha))


def test_cosine_restarts_t_mul_1_m_mul():
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": 1.0, "first_decay_steps": 4,
         "t_mul": 1.0, "m_mul": 0.5, "alpha": 0.1}
    )
    assert f(3) == approx(0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)) + 0.1)
    assert f(4) == approx(0.9 * 0.5 + 0.1)
    assert f(8) == approx(0.9 * 0.25 + 0.1)
    assert f(10) == approx(0.9 * 0.5 * 0.25 * (1 + math.cos(math.pi * 0.5)) + 0.1)


@pytest.mark.parametrize("t_mul", [3.0, 1.5])
def test_cosine_restarts_every_restart_boundary_geometric(t_mul):
    """The step where a period starts must give the period's full value, for every restart.

    With t_mul=3 the 5th restart is at first*(1+3+9+27+81)=121*first; with t_mul=1.5 and
    first_decay_steps=16 the 5th restart is at 16*(1+1.5+2.25+3.375+5.0625)=211.
    """
    first = 16 if t_mul == 1.5 else 10
    m = 0.5
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": 1.0, "first_decay_steps": first,
         "t_mul": t_mul, "m_mul": m, "alpha": 0.0}
    )
    start = 0.0
    prev_start = prev_len = None
    for i in range(8):
        length = first * t_mul**i
        if start != int(start):
            break
        s = int(start)
        assert f(s) == approx(m**i), (i, s)
        if i:
            frac = (s - 1 - prev_start) / prev_len
            assert f(s - 1) == approx(m ** (i - 1) * 0.5 * (1 + math.cos(math.pi * frac))), (i, s)
        prev_start, prev_len = start, length
        start += length


# --------------------------------------------------------------------------- one_cycle


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
def test_one_cycle_matches_torch(anneal, three_phase):
    n, max_lr = 100, 0.1
    spec = {"schedule": "one_cycle", "max_lr": max_lr, "total_steps": n, "pct_start": 0.25,
            "anneal_strategy": anneal, "div_factor": 10.0, "final_div_factor": 100.0, "three_phase": three_phase}
    f = make_lr_fn(spec)
    ref = torch_lrs(
        max_lr,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(
            o, max_lr=max_lr, total_steps=n, pct_start=0.25, anneal_strategy=anneal, div_factor=10.0,
            final_div_factor=100.0, three_phase=three_phase, cycle_momentum=False,
        ),
        n,
    )
    assert [f(k) for k in range(n)] == [approx(v) for v in ref]
    assert f(0) == approx(max_lr / 10.0)
    assert f(n - 1) == approx(max_lr / 10.0 / 100.0)


def test_one_cycle_torch_defaults_and_total_steps_kwarg():
    n, max_lr = 37, 0.3
    f = make_lr_fn({"schedule": "one_cycle", "max_lr": max_lr}, total_steps=n)
    ref = torch_lrs(
        max_lr,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=max_lr, total_steps=n, cycle_momentum=False),
        n,
    )
    assert [f(k) for k in range(n)] == [approx(v) for v in ref]


def test_one_cycle_without_total_steps_is_an_error():
    with pytest.raises(ScheduleError):
        make_lr_fn({"schedule": "one_cycle", "max_lr": 0.1})(0)


# --------------------------------------------------------------------------- warm-up


def _check_linear_warmup(f, w: int, start: float, target: float) -> None:
    assert f(0) == approx(start)
    for k in range(w + 1):
        assert f(k) == approx(start + (target - start) * k / w), k


def test_warmup_constant():
    f = make_lr_fn({"schedule": "constant", "initial_learning_rate": 0.1, "warmup_steps": 10})
    _check_linear_warmup(f, 10, 0.0, 0.1)
    assert f(5) == approx(0.05)
    assert f(10) == approx(0.1)
    assert f(1000) == approx(0.1)


def test_warmup_exponential_with_start_lr():
    w = 4
    f = make_lr_fn(
        {"schedule": "exponential", "initial_learning_rate": 0.1, "decay_steps": 100, "decay_rate": 0.5,
         "warmup_steps": w, "warmup_start_lr": 0.01}
    )
    _check_linear_warmup(f, w, 0.01, 0.1)
    assert f(2) == approx(0.01 + (0.1 - 0.01) * 0.5)
    assert f(w) == approx(0.1)  # wrapped schedule's step 0
    assert f(w + 50) == approx(0.1 * 0.5**0.5)  # wrapped schedule's step 50
    assert f(w + 100) == approx(0.05)


def test_warmup_cosine_restarts_brief_example():
    w = 50
    f = make_lr_fn(
        {"schedule": "cosine_restarts", "initial_learning_rate": 0.01, "first_decay_steps": 1000, "t_mul": 2.0,
         "m_mul": 1.0, "alpha": 0.0, "warmup_steps": w, "warmup_start_lr": 0.0}
    )
    _check_linear_warmup(f, w, 0.0, 0.01)
    assert f(25) == approx(0.005)
    assert f(w + 500) == approx(0.005)
    assert f(w + 999) == approx(0.01 * 0.5 * (1 + math.cos(math.pi * 0.999)))
    assert f(w + 1000) == approx(0.01)  # restart, shifted by the warm-up
    assert f(w + 3000) == approx(0.01)


def test_warmup_cosine_with_start_lr():
    w = 10
    f = make_lr_fn(
        {"schedule": "cosine", "initial_learning_rate": 0.1, "decay_steps": 100, "warmup_steps": w,
         "warmup_start_lr": 0.001}
    )
    _check_linear_warmup(f, w, 0.001, 0.1)
    assert f(w + 50) == approx(0.05)
    assert f(w + 100) == pytest.approx(0.0, abs=1e-15)


def test_warmup_step_in_epochs_counts_from_its_own_step_0():
    w, spe = 3, 4
    f = make_lr_fn(
        {"schedule": "step", "initial_learning_rate": 0.1, "step_size": 2, "gamma": 0.5, "unit": "epoch",
         "warmup_steps": w, "warmup_start_lr": 0.02},
        steps_per_epoch=spe,
    )
    _check_linear_warmup(f, w, 0.02, 0.1)
    assert f(w + 7) == approx(0.1)  # wrapped step 7 = epoch 1
    assert f(w + 8) == approx(0.05)  # wrapped step 8 = epoch 2


def test_warmup_one_cycle():
    w, n, max_lr = 5, 50, 0.1
    f = make_lr_fn({"schedule": "one_cycle", "max_lr": max_lr, "total_steps": n, "warmup_steps": w})
    ref = torch_lrs(
        max_lr,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=max_lr, total_steps=n, cycle_momentum=False),
        n,
    )
    _check_linear_warmup(f, w, 0.0, max_lr / 25.0)
    assert [f(w + k) for k in range(n)] == [approx(v) for v in ref]


def test_warmup_polynomial():
    w = 8
    f = make_lr_fn(
        {"schedule": "polynomial", "initial_learning_rate": 0.4, "decay_steps": 10, "end_learning_rate": 0.0,
         "power": 3.0, "warmup_steps": w}
    )
    _check_linear_warmup(f, w, 0.0, 0.4)
    assert f(w + 5) == approx(0.4 * 0.5**3)


# --------------------------------------------------------------------------- preview


def test_preview_plain_number():
    assert preview_schedule(0.01, 5) == [0.01] * 5
    assert preview_schedule(0.01, 0) == []
    with pytest.raises(ScheduleError):
        preview_schedule(0.01, -1)


def test_preview_schedule_dict():
    out = preview_schedule(
        {"schedule": "cosine_restarts", "initial_learning_rate": 0.01, "first_decay_steps": 4, "warmup_steps": 2},
        8,
    )
    expected = [0.0, 0.005, 0.01, 0.01 * 0.5 * (1 + math.cos(math.pi * 0.25)), 0.005,
                0.01 * 0.5 * (1 + math.cos(math.pi * 0.75)), 0.01, 0.01 * 0.5 * (1 + math.cos(math.pi / 8))]
    assert out == [approx(v) for v in expected]


def test_preview_one_cycle_defaults_total_steps_to_preview_length():
    n, max_lr = 30, 0.05
    out = preview_schedule({"schedule": "one_cycle", "max_lr": max_lr}, n)
    ref = torch_lrs(
        max_lr,
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=max_lr, total_steps=n, cycle_momentum=False),
        n,
    )
    assert out == [approx(v) for v in ref]


def test_preview_epoch_schedule_with_steps_per_epoch():
    out = preview_schedule(
        {"schedule": "multistep", "initial_learning_rate": 0.1, "milestones": [1, 2]}, 6, steps_per_epoch=2
    )
    assert out == [approx(v) for v in (0.1, 0.1, 0.01, 0.01, 0.001, 0.001)]
