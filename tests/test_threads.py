"""Sharing the cores among processes of ours that run side by side."""

import pytest

from densepipe.threads import available_cores, share_cores


@pytest.mark.parametrize("processes", [1, 2, 3, 1000])
def test_processes_split_the_cores(processes):
    env = {}
    share_cores(env, processes)
    threads = int(env["OMP_NUM_THREADS"])
    assert threads == max(1, available_cores() // processes)
    assert threads >= 1 and (threads * processes <= available_cores() or threads == 1)


def test_a_thread_count_the_user_set_is_kept():
    env = {"OMP_NUM_THREADS": "7"}
    share_cores(env, 2)
    assert env == {"OMP_NUM_THREADS": "7"}


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_thread_count_counts_as_unset(blank):
    # OpenMP takes every core when the variable is empty, so it must be filled in like a missing one.
    env = {"OMP_NUM_THREADS": blank}
    share_cores(env, 2)
    assert env["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))
