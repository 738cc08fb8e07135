"""The build's process pool (audioshard.parallel), on its own: order, results and failures."""

import os
import time

import pytest
from conftest import GLIBC_MALLINFO2

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


# Run in a fresh interpreter: malloc thresholds are per process and, once set, stay set.
MALLOC_PROBE = GLIBC_MALLINFO2 + """
import torch
from audioshard.parallel import ordered_map

list(ordered_map(lambda task: task, [[1], [2]], 1))  # an in-process build's pool, finished
for _ in range(3):  # a training step's pattern: the same few-MB tensors allocated and freed again
    before = libc.mallinfo2().hblks
    buffers = [torch.empty(4 << 20, dtype=torch.uint8) for _ in range(4)]
    print(libc.mallinfo2().hblks - before)
    del buffers
"""


def test_after_an_in_process_build_large_buffers_come_from_the_heap_again():
    # The build's malloc settings used to be "restored" to glibc's initial 128 kB thresholds, which glibc then
    # never raises again: every tensor over 128 kB became a fresh mapping, page-faulted in anew each step, and
    # training after an in-process build ran 1.6x slower (tools/bench_train_step.py --after-build).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, check=True).stdout
    new_mappings = [int(n) for n in out.split()]
    assert len(new_mappings) == 3 and new_mappings[1:] == [0, 0]  # reused from the heap, not mapped anew
