"""Regression tests for what the fuzz targets (``fuzz/``) found, one test per finding.

Each test replays the fuzzer's input through its target and checks the
parser itself on the reduced case.  The inputs are in the committed corpus
too (``fuzz/corpus/<target>/regression-*``), so every bounded run starts
from them.
"""

from __future__ import annotations

import argparse
import os

import pytest

from fuzz_targets import vdev
from pyvdpa.app import parse_cpus

CPUS = os.cpu_count() or 1


def test_regression_cpu_range_refused_before_it_is_expanded() -> None:
    # "0-100010001" built a list of a hundred million CPUs before checking
    # any of them against the machine: gigabytes, then a refusal.
    vdev.test_one_input(b"\x02sim-net,name=0\x000-100010001")
    with pytest.raises(argparse.ArgumentTypeError, match="this machine has CPUs"):
        parse_cpus("0-100010001")
    with pytest.raises(argparse.ArgumentTypeError, match="this machine has CPUs"):
        parse_cpus(f"0,{CPUS}-{10**30}")
    assert parse_cpus(f"0-{CPUS - 1}") == tuple(range(CPUS))
