"""``pyvdpa check`` against back-ends with one deliberate bug each.

The back-end is pyvdpa's own vhost-user server with a Python loopback NIC,
run as a process of its own (this file, run as a program), with one bug
put between its dispatcher and the socket:

* ``vring-base``: GET_VRING_BASE answers one more than the true index;
* ``ack-zero``: every REPLY_ACK says 0, refusals included (the request
  is still refused inside, the front-end is told otherwise);
* ``crash-indirect``: the process exits at the first SET_VRING_KICK once
  INDIRECT_DESC was negotiated;
* ``mute-vring-base``: GET_VRING_BASE stops the ring but is never answered;
* ``no-call``: the device signals an eventfd of its own, never the front-end's
  call eventfd.

Each must fail exactly the cases its bug breaks, on top of what the
same back-end without a bug fails, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvdpa.check.cases import case_ids

HERE = Path(__file__)


def _serve(bug: str, path: str) -> None:
    """Serve a loopback NIC on ``path`` with ``bug`` (run as a program)."""
    import signal
    import struct

    from pyvdpa.devices.net import NetDevice
    from pyvdpa.vhost_user import codec
    from pyvdpa.vhost_user.backend import BackendConnection
    from pyvdpa.vhost_user.link import Reply
    from pyvdpa.vhost_user.protocol import HeaderFlags, Request
    from pyvdpa.vhost_user.server import BackendServer
    from pyvdpa.vhost_user.transport import Frame
    from pyvdpa.virtio.constants import VirtioFeature

    def on_connect(connection: BackendConnection) -> None:
        handle = connection.handle
        features = 0

        def buggy(frame: Frame) -> list[Reply]:
            nonlocal features
            request = frame.header.request
            if request == Request.SET_FEATURES and len(frame.body) == 8:
                features = int.from_bytes(frame.body, "little")
            if (
                bug == "crash-indirect"
                and request == Request.SET_VRING_KICK
                and features & VirtioFeature.RING_INDIRECT_DESC
            ):
                os._exit(3)
            if bug == "no-call" and request == Request.SET_VRING_CALL and frame.fds:
                os.close(frame.fds[0])
                frame.fds[0] = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                own_reply = codec.has_reply(Request(request))
            except ValueError:
                own_reply = False
            replies = handle(frame)
            if bug == "mute-vring-base" and request == Request.GET_VRING_BASE:
                return []
            if bug == "vring-base" and request == Request.GET_VRING_BASE:
                index, num = struct.unpack_from("=II", replies[0].data, codec.HEADER.size)
                body = struct.pack("=II", index, num + 1)
                replies = [Reply(codec.HEADER.pack(request, 0x5, len(body)) + body)]
            if bug == "ack-zero" and frame.header.flags & HeaderFlags.NEED_REPLY and not own_reply:
                replies = [Reply(codec.HEADER.pack(request, 0x5, 8) + bytes(8))]
            return replies

        connection.handle = buggy  # type: ignore[method-assign]

    server = BackendServer(path, lambda: NetDevice(mode="loopback"), on_connect=on_connect)
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


@pytest.fixture
def broken(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(bug: str) -> str:
        path = str(tmp_path / f"{bug}.sock")
        proc = subprocess.Popen([sys.executable, str(HERE), bug, path])
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, "back-end did not start"
            time.sleep(0.05)
        return path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)


def _check(path: str, *options: str) -> dict[str, tuple[str, str]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyvdpa",
            "check",
            "--socket",
            path,
            "--type",
            "net",
            "--json",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]", 1)[1].split()[0] for line in progress] == case_ids()
    report = json.loads(proc.stdout)
    return {r["id"]: (r["verdict"], r["detail"]) for r in report["results"]}


def _failed(results: dict[str, tuple[str, str]]) -> set[str]:
    return {case for case, (verdict, _) in results.items() if verdict == "fail"}


#: What the loopback NIC fails without a bug: it leaves a disabled TX ring alone
#: where the spec wants its frames taken and dropped.
BASELINE = {"ring.disabled-tx"}

REFUSED_BY_ACK = {
    "neg.unoffered",
    "neg.reply-ack-fail",
    "bad.unknown",
    "bad.short",
    "fd.kick-none",
    "fd.too-many",
    "region.pipe",
    "region.fd-count",
    "region.nine",
    "bad.vring-index",
}


def test_wrong_vring_base_fails_the_base_cases(broken: Callable[[str], str]) -> None:
    results = _check(broken("vring-base"))

    assert _failed(results) == BASELINE | {"ring.base", "data.packed", "data.indirect-packed"}
    assert results["ring.base"][1] == "GET_VRING_BASE of vring 1: 14, 13 expected"


def test_acking_refusals_with_zero_fails_the_refusal_cases(broken: Callable[[str], str]) -> None:
    results = _check(broken("ack-zero"))

    assert _failed(results) == BASELINE | REFUSED_BY_ACK
    assert "accepted" in results["neg.reply-ack-fail"][1]


def test_crash_on_indirect_fails_the_rest(broken: Callable[[str], str]) -> None:
    results = _check(broken("crash-indirect"))

    ids = case_ids()
    after = ids[ids.index("data.indirect") + 1 :]
    verdict, detail = results["data.indirect"]
    assert verdict == "fail" and "no longer serving" in detail
    for case in after:
        verdict, detail = results[case]
        assert verdict in ("fail", "n/a"), case
        if verdict == "fail":
            assert detail == "back-end gone after case data.indirect"
    before = ids[: ids.index("data.indirect")]
    assert _failed({case: results[case] for case in before}) == BASELINE


def test_unanswered_vring_base_times_out_case_by_case(broken: Callable[[str], str]) -> None:
    results = _check(broken("mute-vring-base"), "--timeout", "2")

    expected = {"ring.base", "ring.stop", "data.packed", "data.indirect-packed"}
    assert _failed(results) == BASELINE | expected
    for case in expected:
        assert results[case][1] == "no answer within 2 s", case


def test_no_used_buffer_notification_fails_the_call_case(broken: Callable[[str], str]) -> None:
    results = _check(broken("no-call"))

    assert _failed(results) == BASELINE | {"data.call"}
    assert results["data.call"][1] == "vring 1: 8 chains used, no call eventfd signal"


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
