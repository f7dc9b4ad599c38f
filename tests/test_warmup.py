"""The warm-up check's parts (lightning_smd.analysis.warmup): the early peak it keeps and the advice it gives. End to
end on a real Trainer: tests/test_schedules.py::test_the_warm_up_check_says_a_fast_start_and_how_long_a_warm_up_would_cap_it."""

import numpy as np

from lightning_smd.analysis.warmup import EARLY_STEPS, FAST_START, EarlyWatch, warmup_advice


def test_the_early_peak_is_kept_until_the_unit_settles_and_only_a_settled_fast_start_counts():
    watch = EarlyWatch(3, stride=1)
    idx, group = np.arange(3), np.array([0, 0, 1])
    peak = np.array([0.01, 0.01, np.nan])  # the third unit has no reference (no schedule read): never judged
    no = np.zeros(3, dtype=bool)
    for step in range(1, 201):
        delta = np.array([0.05, 0.02, 0.05]) if step <= 100 else np.array([0.01, 0.01, 0.01])
        settled = np.array([step == 150, False, step == 150])
        watch.observe(idx, group, delta, peak, settled if step >= 150 else no, step)
    # the (bias-corrected) average of Δ was 5× and 2× the peak Δ* in the first 100 steps, and fell after them
    assert abs(watch.early_ratio[0] - 5.0) < 1e-9
    assert abs(watch.early_ratio[1] - 2.0) < 1e-9 and np.isnan(watch.early_ratio[2])
    assert 1 <= watch.early_ratio_step[0] <= 100
    assert watch.delta.value()[0] < 0.01 * (1.0 + 4.0 * np.exp(-50 / EARLY_STEPS))  # 50 steps at 0.01 after them
    assert list(watch.early_end) == [150, -1, 150] and list(watch.early_group) == [0, 0, 1]
    # after settling nothing changes (a later fast stretch is not the start)
    watch.observe(idx, group, np.full(3, 1.0), peak, no, 201)
    assert watch.early_ratio[0] < 5.01 and watch.early_end[0] == 150
    fast = watch.fast(np.ones(3, dtype=bool))
    assert FAST_START < 5.0 and list(fast) == [True, False, False]
    assert list(watch.fast(np.array([False, True, True]))) == [False, False, False]


def test_the_check_survives_a_checkpoint():
    a = EarlyWatch(2, stride=1)
    a.observe(np.arange(2), np.zeros(2, dtype=int), np.array([0.04, 0.01]), np.array([0.01, 0.01]), np.zeros(2, dtype=bool), 1)
    b = EarlyWatch(2, stride=1)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(b.early_ratio, a.early_ratio) and np.array_equal(b.delta.value(), a.delta.value())


def test_the_advice_names_the_warm_up_to_lengthen_or_to_add():
    ramp = np.concatenate([np.linspace(0.01, 0.1, 10), np.full(90, 0.1)])
    short = warmup_advice(ramp, 212.4)
    assert "warms up over 9 steps" in short and "(213 steps)" in short and "lengthen the warm-up" in short
    for lr in (None, np.full(100, 0.1), np.linspace(0.1, 0.0, 100)):  # none read, constant, a decay from the start
        added = warmup_advice(lr, 100.0)
        assert added.startswith("A learning-rate warm-up over about 100 steps") and "Kosson" in added
    assert "a relaxation time's worth of" in warmup_advice(None, float("nan"))
