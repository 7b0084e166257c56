"""Poll-mode workers are pinned by default: which CPU, the warning, ``--cpus`` overriding."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvdpa.dataplane.engine import (
    WORKER_THREAD_PREFIX,
    Engine,
    EngineMode,
    pick_poll_cpu,
    polling_cpus,
)
from pyvdpa.errors import ConfigError


def _workers(pid: int | str = "self") -> dict[int, set[int]]:
    """A process's data-path worker threads: tid -> affinity."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        if name.startswith(WORKER_THREAD_PREFIX):
            found[int(task.name)] = os.sched_getaffinity(int(task.name))
    return found


def _new_workers(others: set[int], pid: int | str = "self") -> dict[int, set[int]]:
    """Worker threads not in ``others``, once one has named itself (it does so once running)."""
    deadline = time.monotonic() + 10
    while True:
        found = {tid: a for tid, a in _workers(pid).items() if tid not in others}
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_pick_prefers_the_highest_cpu_no_poller_holds() -> None:
    assert pick_poll_cpu({0, 1, 2, 3}, {}) == 3
    assert pick_poll_cpu({0, 1, 2, 3}, {3: 1}) == 2
    assert pick_poll_cpu({1, 2}, {2: 1, 1: 1}) == 2
    assert pick_poll_cpu({0, 1, 2}, {0: 1, 1: 2, 2: 2}) == 0
    with pytest.raises(ConfigError):
        pick_poll_cpu(set(), {})


def test_poll_engine_without_cpus_is_pinned_and_says_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    allowed = os.sched_getaffinity(0)
    held = polling_cpus()
    others = set(_workers())
    caplog.set_level(logging.INFO, logger="pyvdpa.dataplane.engine")
    with Engine(EngineMode.POLL) as engine:
        (cpu,) = engine.cpus
        assert cpu == pick_poll_cpu(allowed, held)
        if not held:
            assert cpu == max(allowed)
        assert list(_new_workers(others).values()) == [{cpu}]
        assert polling_cpus().get(cpu) == held.get(cpu, 0) + 1
    assert f"data-path worker 0 polls on CPU {cpu} (picked)" in caplog.text
    assert ("share one core" in caplog.text) == (cpu in held)
    assert polling_cpus() == held
    assert os.sched_getaffinity(0) == allowed


def test_second_poller_takes_another_cpu_and_an_override_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    held = polling_cpus()
    free = [cpu for cpu in allowed if cpu not in held]
    if len(free) < 2:
        pytest.skip("needs two CPUs no poller of this process holds")
    with Engine(EngineMode.POLL) as first, Engine(EngineMode.POLL) as second:
        assert first.cpus == (free[-1],)
        assert second.cpus == (free[-2],)
        assert "share one core" not in caplog.text
        # --cpus overrides the pick, even onto a CPU another poller holds.
        with Engine(EngineMode.POLL, cpus=[free[-1]]) as third:
            assert third.cpus == (free[-1],)
        warning = re.search(r"polls on CPU (\d+), which 1 other polling worker", caplog.text)
        assert warning is not None and int(warning.group(1)) == free[-1]
        assert all(r.levelno == logging.WARNING for r in caplog.records if "share" in r.message)
    # Both let go of their CPUs: a new poller takes the highest free one again.
    assert polling_cpus() == held
    with Engine(EngineMode.POLL) as again:
        assert again.cpus == (free[-1],)


def test_other_modes_stay_unpinned_without_cpus() -> None:
    with Engine(EngineMode.EVENT) as engine:
        assert engine.cpus == (None,)


def test_pyvdpa_run_engine_poll_pins_its_worker() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvdpa", "run", "--vdev", "sim-net,name=net0",
         "--engine", "poll", "-i"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 120
        while "poll-mode data path" not in line:
            assert time.monotonic() < deadline
            line = proc.stderr.readline()
            assert line, "pyvdpa run ended before saying where it polls"
        found = re.search(r"pinned to CPU (\d+) \(--cpus to choose\)", line)
        assert found is not None, line
        cpu = int(found.group(1))
        assert cpu == max(os.sched_getaffinity(0))
        assert list(_new_workers(set(), proc.pid).values()) == [{cpu}]
        _, err = proc.communicate("quit\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
