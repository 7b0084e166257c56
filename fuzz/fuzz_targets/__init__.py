"""Fuzz targets: every parser of untrusted input, one module each.

Each module has a ``test_one_input(data: bytes) -> None`` that feeds
``data`` to one parser.  The contract a target checks is the parser's: it
returns a value or raises a typed :class:`~pyvdpa.errors.PyvdpaError`
subclass it documents.  Any other exception, a hang or a wrong verdict
(a round trip that changes a message, two chain walkers that disagree)
escapes from ``test_one_input`` and is a finding.

The modules run under atheris (``fuzz/run.py``), which instruments
pyvdpa's Python code for coverage, and, without it, under pytest, which
replays the committed corpus (``fuzz/corpus/<target>/``).
"""

from __future__ import annotations

TARGETS = ("codec", "chain", "iotlb", "inflight", "vdev", "control", "kernel")
"""The target names: a module of this package and a directory of the corpus."""

__all__ = ["TARGETS"]
