"""The build's process pool (audioshard.parallel), on its own: order, results and failures."""

import os
import time

import pytest

from audioshard.errors import BuildError
from audioshard.parallel import ordered_map


def squares_and_pid(task):
    time.sleep(0.01)  # long enough that the helpers, once started, claim tasks too
    return [(x * x, os.getpid()) for x in task]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_task_order_whatever_the_worker_count(workers):
    tasks = [[i, i + 100] for i in range(40)]
    out = list(ordered_map(squares_and_pid, tasks, workers))
    assert [v for v, _ in out] == [x * x for task in tasks for x in task]
    if workers > 1:  # the helpers really took tasks: more than one process did the work
        assert len({pid for _, pid in out}) > 1


PARENT = os.getpid()  # the test process; forked helpers have other ids


def fails_in_helpers(task):
    if os.getpid() != PARENT:
        raise MemoryError("pretend")
    time.sleep(0.02)  # leave tasks for the helper to claim
    return list(task)


def test_a_failing_helper_stops_the_map_with_its_traceback():
    with pytest.raises(BuildError, match="(?s)a build worker process failed.*MemoryError: pretend"):
        list(ordered_map(fails_in_helpers, [[i] for i in range(20)], 2))
