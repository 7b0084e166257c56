#!/usr/bin/env python3
"""Run one fuzz target under atheris (libFuzzer), with coverage of pyvdpa's Python code.

Usage::

    python3 fuzz/run.py TARGET [libFuzzer options and corpus directories...]
    python3 fuzz/run.py TARGET --replay [FILE_OR_DIR...]
    python3 fuzz/run.py TARGET --lines [FILE_OR_DIR...]

With no corpus directory, the committed corpus ``fuzz/corpus/TARGET`` is
used, and new inputs are added to it.  Every pyvdpa module imported by
the target is instrumented for coverage, except the compiled data path's
kernels, whose Python functions numba compiles from their bytecode.
``--replay`` runs the given inputs (by default the corpus) once each,
without libFuzzer, and stops at the first finding; ``--lines`` replays them
and prints, for each pyvdpa source file they reach, how many of its lines
ran (the figure the long runs report beside libFuzzer's edge count).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType, ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fuzz_targets import TARGETS  # noqa: E402

#: Names the target to the processes libFuzzer starts (they get its options only).
TARGET_VARIABLE = "PYVDPA_FUZZ_TARGET"

#: The package numba compiles from its functions' bytecode: never instrumented.
KERNELS = "pyvdpa.dataplane.kernels"


def not_instrumented() -> list[str]:
    """The kernels package and every module in it, found without importing pyvdpa."""
    spec = importlib.util.find_spec("pyvdpa")
    if spec is None or spec.origin is None:
        raise SystemExit("pyvdpa is not installed")
    directory = Path(spec.origin).parent.joinpath(*KERNELS.split(".")[1:])
    return [KERNELS, *(f"{KERNELS}.{path.stem}" for path in directory.glob("*.py"))]


def corpus_dir(target: str) -> Path:
    """The committed corpus of ``target``."""
    return HERE / "corpus" / target


def load(target: str, *, instrument: bool) -> Callable[[bytes], None]:
    """Import ``target``'s module (instrumented for coverage) and return its entry point."""
    if target not in TARGETS:
        raise SystemExit(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    module: ModuleType
    if instrument:
        import atheris

        with atheris.instrument_imports(include=["pyvdpa"], exclude=not_instrumented()):
            module = importlib.import_module(f"fuzz_targets.{target}")
    else:
        module = importlib.import_module(f"fuzz_targets.{target}")
    entry: Callable[[bytes], None] = module.test_one_input
    return entry


def replay(entry: Callable[[bytes], None], paths: list[str]) -> int:
    """Run every input under ``paths`` once; return how many ran."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    for path in files:
        entry(path.read_bytes())
    return len(files)


def _code_lines(code: CodeType) -> Iterator[int]:
    """Lines of the functions in ``code`` (module and class bodies run at import)."""
    if code.co_flags & inspect.CO_OPTIMIZED:
        lines = (line for _, _, line in code.co_lines() if line is not None)
        # The def line itself belongs to the enclosing body.
        yield from (line for line in lines if line != code.co_firstlineno)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_lines(const)


def line_coverage(entry: Callable[[bytes], None], paths: list[str]) -> dict[str, tuple[int, int]]:
    """Replay ``paths``; per pyvdpa source file, (lines run, lines with code)."""
    seen: dict[str, set[int]] = {}
    root = str(Path(importlib.import_module("pyvdpa").__file__ or "").parent)

    def trace(frame: FrameType, event: str, arg: object) -> Any:
        filename = frame.f_code.co_filename
        if not filename.startswith(root):
            return None
        lines = seen.setdefault(filename, set())
        lines.add(frame.f_lineno)

        def local(frame: FrameType, event: str, arg: object) -> Any:
            lines.add(frame.f_lineno)
            return local

        return local

    sys.settrace(trace)
    try:
        replay(entry, paths)
    finally:
        sys.settrace(None)
    report: dict[str, tuple[int, int]] = {}
    for filename, lines in sorted(seen.items()):
        source = Path(filename).read_text()
        total = set(_code_lines(compile(source, filename, "exec")))
        report[str(Path(filename).relative_to(root))] = (len(lines & total), len(total))
    return report


def main(argv: list[str]) -> int:
    """Fuzz (or replay) the target ``argv[1]`` names."""
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ntargets: {', '.join(TARGETS)}")
        return 0 if len(argv) >= 2 else 2
    if argv[1] in TARGETS:
        target, options = argv[1], argv[2:]
        # libFuzzer runs this script again for -merge and -fork, without the name.
        os.environ[TARGET_VARIABLE] = target
    elif TARGET_VARIABLE in os.environ:
        target, options = os.environ[TARGET_VARIABLE], argv[1:]
    else:
        raise SystemExit(f"unknown target {argv[1]!r}; targets: {', '.join(TARGETS)}")
    if options[:1] == ["--lines"]:
        entry = load(target, instrument=False)
        report = line_coverage(entry, options[1:] or [str(corpus_dir(target))])
        for name, (run, total) in report.items():
            print(f"{name:40} {run:5} / {total:5} lines")
        run = sum(r for r, _ in report.values())
        total = sum(t for _, t in report.values())
        print(f"{target}: {run} of {total} lines of the pyvdpa files it reaches")
        return 0
    if options[:1] == ["--replay"]:
        entry = load(target, instrument=False)
        count = replay(entry, options[1:] or [str(corpus_dir(target))])
        print(f"{target}: {count} inputs replayed")
        return 0
    entry = load(target, instrument=True)
    import atheris

    if not any(not option.startswith("-") for option in options):
        directory = corpus_dir(target)
        directory.mkdir(parents=True, exist_ok=True)
        options.append(str(directory))
    atheris.Setup([argv[0], *options], entry)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
