"""The fuzz targets in the suite: the committed corpus replayed, then a short fuzzing run each.

The replay runs every input of ``fuzz/corpus/<target>/`` through the
target in this process.  The bounded run starts ``fuzz/run.py`` (atheris,
coverage-guided) for ``PYVDPA_FUZZ_SECONDS`` seconds per target (7 by
default) from the committed corpus, writing what it finds to a temporary
directory; a finding fails the test with the fuzzer's report.  The long
runs and how to add their finds to the corpus are in ``fuzz/README.md``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz_targets import TARGETS

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
SECONDS = int(os.environ.get("PYVDPA_FUZZ_SECONDS", "7"))


def corpus(target: str) -> list[Path]:
    return sorted(path for path in (FUZZ / "corpus" / target).iterdir() if path.is_file())


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays(target: str) -> None:
    entry = importlib.import_module(f"fuzz_targets.{target}").test_one_input
    inputs = corpus(target)
    assert inputs, f"fuzz/corpus/{target} is empty"
    for path in inputs:
        entry(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_bounded_fuzzing_run(target: str, tmp_path: Path) -> None:
    found = tmp_path / "found"
    found.mkdir()
    command = [
        sys.executable, str(FUZZ / "run.py"), target, str(found), str(FUZZ / "corpus" / target),
        # A fixed seed: the suite's run is the same every time; long runs explore.
        f"-max_total_time={SECONDS}", "-seed=20261202", "-timeout=10", "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 120)
    # libFuzzer's progress lines would push the finding out of the report.
    progress = (" NEW ", " REDUCE ", " pulse ", "INFO: Instrumenting")
    lines = [line for line in run.stderr.splitlines() if not any(p in line for p in progress)]
    report = f"exit status {run.returncode}\n" + "\n".join(lines)[-6000:]
    assert run.returncode == 0, report
    assert "stat::number_of_executed_units" in report, report
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*")), report
