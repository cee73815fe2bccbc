"""Processes and threads of ``eegfast prepare`` on machines with many cores."""

import argparse
import os

import pytest

from eegfast.data import prepare as prepare_module


def default_workers() -> int:
    parser = argparse.ArgumentParser()
    prepare_module.configure_parser(parser)
    return parser.parse_args(["x", "--out", "o"]).workers


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity here")
@pytest.mark.parametrize(("allowed", "expected"), [({0, 1}, 2), ({5}, 1), (set(range(40)), 8)])
def test_default_workers_count_the_cpus_this_process_may_use(monkeypatch, allowed, expected):
    """A job given 2 of a 64-core node's CPUs (Slurm, ``taskset``, a container's cpuset)
    started 8 workers by default (``os.cpu_count()`` counts the machine's): 4 processes per
    core, each holding a recording in memory."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    assert default_workers() == expected
