"""Process machinery shared by the third-party peer launchers.

Theory of operation: every peer runs in a session of its own, so that its
process group holds it and anything it forks, and stopping the peer signals
the whole group. Three layers keep peers from outliving the tests that started
them: the launchers are context managers that stop the group on exit, an
``atexit`` hook stops whatever still runs when the interpreter ends, and the
kernel is asked (``setpriv --pdeathsig``) to kill the peer if the test process
itself dies. A daemon thread drains the peer's merged stdout and stderr into a
text buffer, so the peer never blocks on a full pipe and tests can wait for a
regular expression to appear in its output.

The parent-death signal fires when the *thread* that forked the peer exits:
start peers from a thread that lives as long as they do (pytest's main thread
does).
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "PeerError",
    "PeerProcess",
    "PeerTimeoutError",
    "check_socket_path",
    "qemu_opt",
]

_TAIL_CHARS = 4000
# sun_path in struct sockaddr_un, including the terminating NUL.
_SUN_PATH_SIZE = 108
_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL")

_live: set[PeerProcess] = set()
_live_lock = threading.Lock()


class PeerError(RuntimeError):
    """A third-party peer failed to start, exited early or misbehaved."""


class PeerTimeoutError(PeerError, TimeoutError):
    """A third-party peer did not reach the awaited state in time."""


def check_socket_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a Path, or raise ValueError if it cannot name a unix socket."""
    if len(os.fsencode(path)) >= _SUN_PATH_SIZE:
        raise ValueError(f"unix socket path longer than {_SUN_PATH_SIZE - 1} bytes: {path}")
    return Path(path)


def qemu_opt(value: str | os.PathLike[str]) -> str:
    """Escape ``value`` for a QEMU ``key=value,...`` option string.

    QEMU's option parser reads a doubled comma as a literal comma.
    """
    return os.fspath(value).replace(",", ",,")


def _stop_all_live() -> None:
    with _live_lock:
        live = list(_live)
    for peer in live:
        peer.kill()


atexit.register(_stop_all_live)


class PeerProcess:
    """A third-party program run in its own process group, output captured.

    Subclasses refine three hooks: :meth:`_wait_ready` (called after the
    process starts; raise if it never becomes usable), :meth:`_request_exit`
    (ask the program to exit on its own) and :meth:`_cleanup` (remove what it
    leaves behind once it has gone).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        program: str | None = None,
    ) -> None:
        """Describe the process; nothing runs until :meth:`start`.

        ``program`` is the third-party executable, checked for at start; it
        defaults to ``argv[0]`` and differs when ``argv`` starts with a wrapper.
        """
        self.argv: tuple[str, ...] = tuple(argv)
        self.name = name
        self.program = argv[0] if program is None else program
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._text = ""
        self._eof = False
        self._cond = threading.Condition()

    @property
    def pid(self) -> int:
        """Process id of the started program (also its process group id)."""
        return self._popen().pid

    @property
    def running(self) -> bool:
        """True while the started program has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status, or None while running or before start."""
        return None if self._proc is None else self._proc.poll()

    def start(self) -> Self:
        """Start the program and wait until it is ready; stop it if it never is."""
        if self._proc is not None:
            raise PeerError(f"{self.name}: already started")
        if shutil.which(self.program) is None:
            raise PeerError(f"{self.program} not found: run scripts/setup.sh")
        self._proc = subprocess.Popen(
            (*_DIE_WITH_PARENT, *self.argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with _live_lock:
            _live.add(self)
        self._reader = threading.Thread(target=self._drain, name=f"{self.name}-output", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def output(self, start: int = 0) -> str:
        """Everything the program printed so far, from offset ``start``."""
        with self._cond:
            return self._text[start:]

    def mark(self) -> int:
        """Current end of the output, to pass as ``start`` to :meth:`wait_for`."""
        with self._cond:
            return len(self._text)

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float, start: int = 0
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches the output at or after offset ``start``.

        Raises :class:`PeerTimeoutError` after ``timeout`` seconds and
        :class:`PeerError` as soon as the program has exited without a match.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = regex.search(self._text, start)
                if found is not None:
                    return found
                if self._eof:
                    raise PeerError(self._describe(f"exited before printing {regex.pattern!r}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeoutError(
                        self._describe(f"did not print {regex.pattern!r} within {timeout} s")
                    )
                self._cond.wait(remaining)

    def write(self, text: str) -> None:
        """Send ``text`` to the program's standard input."""
        stdin = self._popen().stdin
        if stdin is None:
            raise PeerError(f"{self.name}: no standard input")
        try:
            stdin.write(text.encode())
            stdin.flush()
        except BrokenPipeError as exc:
            raise PeerError(self._describe("closed its standard input")) from exc

    def wait_exit(self, timeout: float) -> int:
        """Wait for the program to exit by itself and return its exit status.

        On timeout the program is killed and :class:`PeerTimeoutError` raised.
        """
        proc = self._popen()
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PeerTimeoutError(self._describe(f"still running after {timeout} s")) from None
        self._finish()
        return status

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the program to exit, then SIGTERM, then SIGKILL its process group."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(PeerError, OSError):
                self._request_exit()
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    proc.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    self._signal_group(sig)
            proc.wait()
        self._finish()

    def kill(self) -> None:
        """SIGKILL the program's process group at once and reap it."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(signal.SIGKILL)
        proc.wait()
        self._finish()

    def __enter__(self) -> Self:
        """Start the program unless it already runs."""
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the program whatever happened in the block."""
        self.stop()

    def _wait_ready(self) -> None:
        """Block until the program is usable; the default waits for nothing."""

    def _request_exit(self) -> None:
        """Ask the program to exit on its own; the default closes its stdin."""
        stdin = self._popen().stdin
        if stdin is not None:
            stdin.close()

    def _cleanup(self) -> None:
        """Remove what the program left behind; the default removes nothing."""

    def _popen(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise PeerError(f"{self.name}: not started")
        return self._proc

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._popen()
        # Members left behind keep the group id allocated, so this reaches them
        # even after the leader has been reaped; with none left it finds no group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _finish(self) -> None:
        proc = self._popen()
        self._signal_group(signal.SIGKILL)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if self._reader is not None:
            self._reader.join(5.0)
        with _live_lock:
            was_live = self in _live
            _live.discard(self)
        if was_live:
            self._cleanup()

    def _drain(self) -> None:
        stdout = self._popen().stdout
        assert stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = decoder.decode(chunk, final=not chunk).replace("\r", "")
            with self._cond:
                self._text += text
                if not chunk:
                    self._eof = True
                self._cond.notify_all()
            if not chunk:
                stdout.close()
                return

    def _describe(self, what: str) -> str:
        with self._cond:
            tail = self._text[-_TAIL_CHARS:]
        status = self.returncode
        state = "running" if status is None else f"exit status {status}"
        return f"{self.name} {what} ({state}); last output:\n{tail}"
