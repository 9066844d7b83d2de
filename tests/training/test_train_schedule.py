"""LR schedule: linear warm-up then cosine decay to a floor, against the formula written out."""
import math

import pytest
import torch

from saefast.training.schedule import WarmupCosine, make_scheduler


def _expected(step, warmup, total, floor):
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - 1 - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


@pytest.mark.parametrize("warmup,total,floor", [(0, 1, 0.1), (5, 50, 0.5), (10, 11, 0.0), (3, 17, 1.0)])
def test_scheduler_follows_warmup_cosine(warmup, total, floor):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=2e-3)
    sched = make_scheduler(opt, warmup, total, floor)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [2e-3 * _expected(s, warmup, total, floor) for s in range(total)]
    assert seen == pytest.approx(want, rel=1e-12)
    if warmup:
        assert seen[0] == pytest.approx(2e-3 / warmup)
    assert seen[min(warmup, total - 1)] == pytest.approx(2e-3) or total - 1 == warmup
    assert seen[-1] == pytest.approx(2e-3 * (floor if total - 1 > warmup else 1.0))
    assert all(a >= b - 1e-15 for a, b in zip(seen[warmup:], seen[warmup + 1:])), "decay must be monotone"


def test_scheduler_state_round_trip_continues_identically():
    def run(split):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([param], lr=1.0)
        sched = make_scheduler(opt, 4, 30, 0.2)
        lrs = []
        for step in range(30):
            if step == split:
                state, opt_state = sched.state_dict(), opt.state_dict()
                opt2 = torch.optim.Adam([param], lr=1.0)
                sched = make_scheduler(opt2, 4, 30, 0.2)
                opt2.load_state_dict(opt_state)  # as the trainer does: the LR lives in the optimizer state
                sched.load_state_dict(state)
                opt = opt2
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs
    assert run(split=-1) == run(split=13)


@pytest.mark.parametrize("kwargs,match", [({"warmup_steps": -1, "total_steps": 5, "floor": 0.1}, "warmup_steps"),
                                          ({"warmup_steps": 0, "total_steps": 0, "floor": 0.1}, "total_steps"),
                                          ({"warmup_steps": 0, "total_steps": 5, "floor": 1.5}, "floor")])
def test_schedule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WarmupCosine(**kwargs)
