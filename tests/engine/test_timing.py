"""The benchmark tools' timer: warm-up calls untimed, the median of the timed ones."""

import time

from vimdet.engine.timing import median_seconds


def test_median_of_the_timed_calls_after_untimed_warm_up():
    durations = iter([0.3, 0.3, 0.01, 0.06, 0.03])  # two warm-up calls, then three timed
    calls = []

    def step():
        calls.append(1)
        time.sleep(next(durations))

    median = median_seconds(step, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.03 <= median < 0.05  # the middle timed call; the slow warm-up calls are left out
