"""The demo's timing: interleaved rounds, stopped once the speed settles, reported with its spread."""
import torch

from fxsparse.demo import spread, time_in_rounds


def test_rounds_stop_between_the_bounds_and_time_every_variant_alike():
    x = torch.randn(4, 4)
    calls = []

    def variant(name):
        def fn(t):
            calls.append(name)
            return t + 1
        return fn

    variants = [(n, variant(n)) for n in ("eager", "inductor", "fxsparse")]
    times = time_in_rounds(variants, x, iters=3, min_rounds=5, max_rounds=8)
    rounds = len(times["eager"])
    assert 5 <= rounds <= 8
    assert all(len(t) == rounds and all(v > 0 for v in t) for t in times.values())
    # each round calls every variant (2 warm-up calls + 3 timed), one variant after the other
    assert calls[:15] == ["eager"] * 5 + ["inductor"] * 5 + ["fxsparse"] * 5
    assert len(calls) == 15 * rounds


def test_rounds_run_to_the_limit_while_the_speed_keeps_moving():
    slow_down = iter(range(1, 100))

    def measure(fn, x, iters):  # fxsparse slower each round: the speed never settles
        return float(next(slow_down)) if fn == "fxsparse" else 1.0

    variants = [(n, n) for n in ("eager", "inductor", "fxsparse")]
    times = time_in_rounds(variants, None, iters=1, min_rounds=3, max_rounds=6, measure=measure)
    assert times["fxsparse"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_rounds_stop_once_the_speed_settles():
    def measure(fn, x, iters):
        return 2.0 if fn == "fxsparse" else 1.0

    variants = [(n, n) for n in ("eager", "inductor", "fxsparse")]
    times = time_in_rounds(variants, None, iters=1, min_rounds=3, max_rounds=6, measure=measure)
    assert len(times["fxsparse"]) == 3


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 2.0]) == "2 [1-3]"
