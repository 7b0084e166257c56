"""The kernels' on-disk cache follows every file of their package; programs load one by one.

numba keys its cache on the file holding a function; the kernels package
keys it on all of its files (:mod:`pyvdpa.dataplane.kernels.cache`).  The
tests run fresh interpreters, each a start of the data path: on a copy of
the sources, which they edit, and with a cache directory of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyvdpa.dataplane.kernels import cache

SOURCES = Path(__file__).resolve().parent.parent / "src"
KERNELS = Path("pyvdpa") / "dataplane" / "kernels"

#: Seconds a start may take to import the data path and load every kernel from the cache.
WARM_START = 1.0

# Publishes one used element of a split queue through the kernel Python calls
# (pyvdpa.dataplane.kernels.ring.publish, which inlines a helper of split.py),
# and reports what the driver would read and whether the code came from the cache.
PUBLISH = textwrap.dedent(
    """
    import json

    import numpy as np

    from pyvdpa.dataplane import kernels as k
    from pyvdpa.dataplane.kernels import cache

    used = np.zeros(4, dtype=np.uint16)
    row = np.zeros(k.QCOLS, dtype=np.int64)
    row[k.Q_SIZE] = 8
    row[k.Q_DEVICE] = used.ctypes.data
    row[k.Q_USED_IDX] = 7
    row[k.Q_UNPUBLISHED] = 1
    k.publish(row)
    stats = k.publish.stats
    print(json.dumps({
        "used_idx": int(used[1]),
        "hits": len(stats.cache_hits),
        "misses": len(stats.cache_misses),
        "dir": str(cache.cache_dir()),
    }))
    """
)


def _run(script: str, sources: Path, cache_dir: Path, **env: str) -> dict[str, object]:
    """Run ``script`` in a fresh interpreter on ``sources``; return what it printed (JSON)."""
    environ = {
        **os.environ,
        "PYTHONPATH": str(sources),
        "NUMBA_CACHE_DIR": str(cache_dir),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    """A copy of the package's sources, without compiled files."""
    copy = tmp_path / "src"
    shutil.copytree(
        SOURCES / "pyvdpa", copy / "pyvdpa", ignore=shutil.ignore_patterns("__pycache__")
    )
    return copy


def test_a_helper_edited_in_one_file_recompiles_its_callers_in_others(
    sources: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    first = _run(PUBLISH, sources, cache_dir)
    assert first["used_idx"] == 7
    assert first["misses"] == 1 and first["hits"] == 0

    again = _run(PUBLISH, sources, cache_dir)
    assert again == {**first, "hits": 1, "misses": 0}

    helper = sources / KERNELS / "split.py"
    text = helper.read_text()
    publishing = "st_rel_u16(q.device + RING_IDX, q.used_idx)"
    assert publishing in text
    helper.write_text(text.replace(publishing, "st_rel_u16(q.device + RING_IDX, q.used_idx + 1)"))

    edited = _run(PUBLISH, sources, cache_dir)
    assert edited["used_idx"] == 8
    assert edited["misses"] == 1 and edited["hits"] == 0
    # A directory per key; the stale one is gone.
    assert edited["dir"] != first["dir"]
    assert not Path(str(first["dir"])).exists()
    assert [path.name for path in Path(str(edited["dir"])).parent.iterdir()] == [
        Path(str(edited["dir"])).name
    ]

    assert _run(PUBLISH, sources, cache_dir)["hits"] == 1


def test_the_key_covers_every_file_and_nothing_else(tmp_path: Path) -> None:
    package = tmp_path / "kernels"
    shutil.copytree(cache.PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert cache.source_key(package) == cache.SOURCE_KEY
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "stale.nbi").write_bytes(b"\0")
    (package / "notes.txt").write_text("not a source")
    assert cache.source_key(package) == cache.SOURCE_KEY
    for path in sorted(package.glob("*.py")):
        text = path.read_bytes()
        path.write_bytes(text + b"\n")
        assert cache.source_key(package) != cache.SOURCE_KEY, path.name
        path.write_bytes(text)
    (package / "new.py").write_text("")
    assert cache.source_key(package) != cache.SOURCE_KEY


def test_the_cache_lies_under_numba_cache_dir_and_keeps_apart_cpu_names(
    sources: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    host = _run(PUBLISH, sources, cache_dir)
    assert Path(str(host["dir"])).is_relative_to(cache_dir)
    generic = _run(PUBLISH, sources, cache_dir, NUMBA_CPU_NAME="generic")
    assert generic["dir"] == host["dir"] and generic["misses"] == 1
    assert _run(PUBLISH, sources, cache_dir, NUMBA_CPU_NAME="generic")["hits"] == 1
    assert _run(PUBLISH, sources, cache_dir)["hits"] == 1


def test_the_worker_loop_and_each_program_compile_alone(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json

        from pyvdpa.dataplane import kernels as k
        from pyvdpa.dataplane.kernels import blk, net, tap, worker

        programs = {
            "loopback": net.loopback, "drop": net.sink, "gen": net.generate,
            "tap": tap.tap_receive, "blk": blk.blk_requests,
        }

        def compiled():
            return sorted(name for name, kernel in programs.items() if kernel.signatures)

        k.load(())
        loop = bool(worker.serve.signatures)
        alone = {"loop": loop, "programs": compiled(), "loaded": sorted(k.loaded())}
        k.load({k.P_DROP})
        drop = {"programs": compiled(), "loaded": sorted(k.loaded())}
        print(json.dumps({"alone": alone, "drop": drop}))
        """
    )
    result = _run(script, SOURCES, tmp_path / "cache")
    assert result["alone"] == {"loop": True, "programs": [], "loaded": []}
    # drop's transmit side is gen's too: only the kernel both call is compiled.
    assert result["drop"] == {"programs": ["drop"], "loaded": ["drop"]}


def test_a_warm_start_stays_under_a_second() -> None:
    script = textwrap.dedent(
        """
        import json
        import time

        started = time.monotonic()
        from pyvdpa.dataplane.engine import warm_up

        warm_up()
        print(json.dumps({"seconds": time.monotonic() - started}))
        """
    )
    environ = {**os.environ, "PYTHONPATH": str(SOURCES)}

    def start() -> float:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=environ,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        seconds: float = json.loads(done.stdout.splitlines()[-1])["seconds"]
        return seconds

    # The first start compiles whatever the cache lacks (the whole data path after a change).
    start()
    assert min(start() for _ in range(3)) < WARM_START
