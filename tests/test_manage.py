"""Managing a running ``pyvdpa run``: control socket, management devices, client, console.

A real ``pyvdpa run --control PATH`` with no device is started once for the
module; devices are added, driven with pyvdpa's own front-end and deleted
over its control socket, with the client (``pyvdpa dev ...``) and with raw
JSON-RPC, including garbage.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvdpa.app import PROMPT, Console, VdpaApp
from pyvdpa.cli import main
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.info import feature_list
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import Session
from pyvdpa.errors import ConfigError, PyvdpaError
from pyvdpa.manage.client import ControlClient
from pyvdpa.manage.commands import parse_words
from pyvdpa.manage.methods import DEVICE_EXISTS, NO_INSTANCES, NO_SUCH_DEVICE, call
from pyvdpa.manage.metrics import parse_address, render_openmetrics
from pyvdpa.manage.operations import Manager
from pyvdpa.manage.rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_MESSAGE,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    MessageReader,
    Request,
    RpcError,
    encode_request,
    parse_request,
    parse_response,
)
from pyvdpa.vdpa.registry import MAX_VDPA_DEVICES, VdpaRegistry
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.virtio.constants import DeviceId
from test_vdpa_port import wait_for

NOBODY = 65534
#: An interpreter another user may run (the test interpreter may sit under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


# ---------------------------------------------------------------------- sans-I/O codec


def test_codec_parses_requests_and_refuses_garbage() -> None:
    request = parse_request(b'{"jsonrpc":"2.0","id":7,"method":"dev_show","params":{"name":"a"}}')
    assert (request.method, request.params, request.id, request.notification) == (
        "dev_show", {"name": "a"}, 7, False,
    )  # fmt: skip
    assert parse_request(b'{"jsonrpc":"2.0","method":"stats"}').notification
    cases = {
        b"not json": PARSE_ERROR,
        b"\xff\xfe": PARSE_ERROR,
        b"[" * 100000: PARSE_ERROR,
        b"[]": INVALID_REQUEST,
        b"42": INVALID_REQUEST,
        b'{"id":1,"method":"stats"}': INVALID_REQUEST,
        b'{"jsonrpc":"1.0","id":1,"method":"stats"}': INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":1,"method":5}': INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":{},"method":"stats"}': INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":1,"method":"stats","extra":1}': INVALID_REQUEST,
        b'{"jsonrpc":"2.0","id":1,"method":"stats","params":[1]}': INVALID_PARAMS,
    }
    for line, code in cases.items():
        with pytest.raises(RpcError) as caught:
            parse_request(line)
        assert caught.value.code == code, line[:40]
    with pytest.raises(RpcError) as caught:
        parse_request(b'{"jsonrpc":"2.0","id":"x","method":"","params":{}}')
    assert caught.value.request_id == "x"


def test_reader_cuts_lines_and_refuses_a_huge_one() -> None:
    reader = MessageReader(limit=16)
    assert reader.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert reader.feed(b":2}\n") == [b'{"b":2}']
    with pytest.raises(RpcError) as caught:
        reader.feed(b"x" * 20)
    assert caught.value.code == INVALID_REQUEST
    assert reader.pending == 0


def test_responses_round_trip() -> None:
    assert parse_response(b'{"jsonrpc":"2.0","id":3,"result":{"a":1}}', 3) == {"a": 1}
    with pytest.raises(RpcError) as caught:
        parse_response(b'{"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"no device"}}', 3)
    assert (caught.value.code, caught.value.message) == (-32001, "no device")
    assert encode_request(1, "stats", {}).endswith(b"\n")


ADD = ("dev", "add", "name")


def test_words_become_requests() -> None:
    command = parse_words(
        [*ADD, "blk0", "mgmtdev", "sim-blk", "path", "disk.img", "readonly", "socket", "b.sock"],
        cwd="/srv",
    )
    assert command.method == "dev_add"
    assert command.params == {
        "name": "blk0", "mgmtdev": "sim-blk", "path": "/srv/disk.img", "readonly": True,
        "socket": "/srv/b.sock",
    }  # fmt: skip
    net = parse_words(
        [*ADD, "net0", "mgmtdev", "sim-net", "mac", "52:54:00:12:34:56", "mtu", "9000"]
    )
    assert net.params["mtu"] == 9000 and net.params["mac"] == "52:54:00:12:34:56"
    assert parse_words(["dev"]).method == "dev_show"
    assert parse_words(["d", "sh", "x"]).params == {"name": "x"}
    vstats = parse_words(["dev", "vstats", "show", "n", "qidx", "3"])
    assert vstats.params == {"name": "n", "qidx": 3}
    assert parse_words(["dev", "config", "show"]).method == "dev_config_show"
    assert parse_words(["mgmtdev", "show"]).method == "mgmtdev_show"
    for bad in (
        "dev frob",
        "dev vstats show n",
        "dev add name x",
        "dev del",
        "bogus",
        "dev show a b",
    ):
        with pytest.raises(ConfigError):
            parse_words(bad.split())


# ---------------------------------------------------------------------- a running pyvdpa run


class Running:
    """``pyvdpa run --control PATH`` started with no device."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.dir = directory
        self.control = directory / "ctl.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyvdpa", "-v", "run", "--control", str(self.control), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while not self.control.exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.05)

    def call(self, method: str, **params: object) -> object:
        with ControlClient(self.control) as client:
            return client.call(method, params)

    def cli(self, *words: str) -> tuple[int, str, str]:
        """``pyvdpa --control PATH WORDS`` in this process (as the command runs)."""
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stdout", out)
            patch.setattr(sys, "stderr", err)
            code = main(["--control", str(self.control), *words])
        return code, out.getvalue(), err.getvalue()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> str:
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return out


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    directory = Path(os.path.realpath("/tmp")) / f"pvm-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    run = Running(directory)
    yield run
    run.stop()
    assert not run.control.exists()
    for leftover in directory.iterdir():
        leftover.unlink()
    directory.rmdir()


def _raw(path: Path, payload: bytes, timeout: float = 10.0) -> list[dict[str, object]]:
    """Send ``payload`` on a fresh connection; the replies until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_devices_added_served_shown_and_deleted(running: Running) -> None:
    sock_blk, sock_net = running.dir / "b.sock", running.dir / "n.sock"
    shown = running.call("mgmtdev_show")
    assert isinstance(shown, dict) and set(shown) == {"sim-net", "sim-blk"}
    free = shown["sim-blk"]["supported_types"]["sim-blk"]["available_instances"]
    assert free == MAX_VDPA_DEVICES
    assert shown["sim-net"]["supported_types"]["sim-net"]["device_api"] == "virtio-net"
    code, out, err = running.cli(
        "dev", "add", "name", "blk0", "mgmtdev", "sim-blk", "size", "1M", "socket", str(sock_blk)
    )
    assert (code, out) == (0, ""), err
    code, out, err = running.cli(
        "dev", "add", "name", "net0", "mgmtdev", "sim-net", "mtu", "9000", "max_vqp", "2",
        "mac", "52:54:00:aa:bb:cc", "socket", str(sock_net), "uuid",
        "0e1e7b5c-3a52-4a35-9a47-0e0b7a3c1f10",
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = running.cli("mgmtdev", "show", "sim-blk")
    assert out.splitlines()[-1] == "  devices blk0"
    free_now = running.call("mgmtdev_show", name="sim-net")
    net_type = free_now["sim-net"]["supported_types"]["sim-net"]  # type: ignore[index]
    assert net_type["available_instances"] == free - 2
    assert net_type["devices"] == ["net0"]

    code, out, _ = running.cli("dev", "show")
    assert out.splitlines() == [
        f"blk0: type block mgmtdev sim-blk vendor_id 0 max_vqs 1 max_vq_size 32768 "
        f"bus vhost-user socket {sock_blk} role server connected false",
        f"net0: type network mgmtdev sim-net vendor_id 0 max_vqs 4 max_vq_size 32768 "
        f"bus vhost-user uuid 0e1e7b5c-3a52-4a35-9a47-0e0b7a3c1f10 socket {sock_net} "
        "role server connected false",
    ]
    code, out, _ = running.cli("-j", "dev", "show", "net0")
    assert json.loads(out) == {
        "dev": {
            "net0": {
                "type": "network", "mgmtdev": "sim-net", "vendor_id": 0, "max_vqs": 4,
                "max_vq_size": 32768, "bus": "vhost-user",
                "uuid": "0e1e7b5c-3a52-4a35-9a47-0e0b7a3c1f10", "socket": str(sock_net),
                "role": "server", "connected": False,
            }
        }
    }  # fmt: skip

    # Traffic on both; net0 is then deleted under its front-end while blk0 serves on.
    with Session(Frontend.connect(sock_blk), memory_size=8 << 20) as blk:
        result = run_blk(blk, rw="randwrite", bs=4096, iodepth=4, verify=True, ios=64, duration=5)
        assert result.errors == 0 and result.verify_errors == 0
        code, out, _ = running.cli("dev", "config", "show", "blk0")
        negotiated = running.call("dev_show", name="blk0")
        assert negotiated["blk0"]["connected"] is True  # type: ignore[index]
        lines = out.splitlines()
        assert lines[0] == (
            "blk0: capacity 2048 blk_size 512 read_only false num_queues 1 seg_max 126"
        )
        assert lines[1].startswith("  negotiated_features ")
        assert set(lines[1].split()[1:]) == set(feature_list(blk.features, DeviceId.BLOCK))
        vstats = running.call("dev_vstats_show", name="blk0", qidx=0)
        queue = vstats["blk0"]  # type: ignore[index]
        assert queue["queue_type"] == "request" and queue["completed_desc"] >= 64

        frontend = Frontend.connect(sock_net)
        with Session(frontend, memory_size=8 << 20) as net:
            sent = run_net(net, mode="io", duration=0.3)
            assert sent.rx_packets > 0
            code, out, _ = running.cli("-jp", "dev", "config", "show", "net0")
            config = json.loads(out)["config"]["net0"]
            code, text, _ = running.cli("dev", "config", "show", "net0")
            assert text.splitlines() == [
                "net0: mac 52:54:00:aa:bb:cc link up link_announce false max_vq_pairs 2 mtu 9000",
                "  negotiated_features " + " ".join(config["negotiated_features"]),
            ]
            assert out.startswith('{\n    "config"')
            fields = ("mac", "link", "link_announce", "max_vq_pairs", "mtu")
            assert {k: config[k] for k in fields} == {
                "mac": "52:54:00:aa:bb:cc", "link": "up", "link_announce": False,
                "max_vq_pairs": 2, "mtu": 9000,
            }  # fmt: skip
            assert config["negotiated_features"] == feature_list(net.features, DeviceId.NET)
            code, out, _ = running.cli("dev", "vstats", "show", "net0", "qidx", "1")
            tx = running.call("dev_vstats_show", name="net0", qidx=1)["net0"]  # type: ignore[index]
            # Field by field: the text line carries the JSON result's values, in order.
            assert out == "net0: " + " ".join(f"{k} {v}" for k, v in tx.items()) + "\n"
            assert list(tx)[:4] == ["queue_index", "queue_type", "received_desc", "completed_desc"]
            assert (tx["queue_index"], tx["queue_type"]) == (1, "tx")
            assert tx["packets"] >= sent.tx_packets
            code, out, err = running.cli("dev", "del", "net0")
            assert (code, out) == (0, ""), err
            # The front-end's connection was closed, the socket removed.
            with pytest.raises(PyvdpaError):
                run_net(net, mode="io", duration=0.2)
        assert not sock_net.exists()
        again = run_blk(blk, rw="randread", bs=4096, iodepth=4, verify=True, ios=64, duration=5)
        assert again.errors == 0
    code, _, err = running.cli("dev", "show", "net0")
    assert code == 1 and err == "pyvdpa: error: no device named 'net0'\n"
    assert (
        running.call("mgmtdev_show")["sim-blk"]["supported_types"]["sim-blk"][  # type: ignore[index]
            "available_instances"
        ]
        == free - 1
    )
    stats = running.call("stats")
    assert list(stats["devices"]) == ["blk0"]  # type: ignore[index]
    running.cli("dev", "del", "blk0")
    assert running.call("dev_show") == {}
    assert not sock_blk.exists()


def test_dev_add_refusals(running: Running) -> None:
    sock = running.dir / "r.sock"
    net, blk = {"name": "x", "mgmtdev": "sim-net"}, {"name": "x", "mgmtdev": "sim-blk"}
    bad = [
        ({"name": "x", "mgmtdev": "sim-gpu"}, "mgmtdev must be one of"),
        ({**net, "mtu": "9000"}, "mtu must be an integer"),
        ({**net, "mtu": 10}, "mtu=10 out of range"),
        ({**net, "path": "/x"}, "takes no key 'path'"),
        ({**blk, "size": "1M", "readonly": "yes"}, "true or false"),
        ({**blk, "path": "rel.img"}, "absolute path"),
        ({**blk, "path": "/nonexistent.img"}, "disk image not found"),
        ({**blk, "name": "a b", "size": "1M"}, "printable"),
        ({**blk, "size": "1M", "uuid": "nope"}, "not a UUID"),
        ({**blk, "name": 5}, "name must be a string"),
    ]
    for params, message in bad:
        with pytest.raises(RpcError) as caught:
            running.call("dev_add", socket=str(sock), **params)
        assert caught.value.code == INVALID_PARAMS, caught.value
        assert message in caught.value.message, caught.value
    running.call("dev_add", name="d0", mgmtdev="sim-blk", size="64K", socket=str(sock))
    with pytest.raises(RpcError) as caught:
        running.call("dev_add", name="d0", mgmtdev="sim-blk", size="64K", socket=str(sock) + "2")
    assert caught.value.code == DEVICE_EXISTS
    with pytest.raises(RpcError) as caught:
        running.call("dev_add", name="d1", mgmtdev="sim-blk", size="64K", socket=str(sock))
    assert caught.value.code == INVALID_PARAMS and "already exists" in caught.value.message
    assert list(running.call("dev_show")) == ["d0"]  # type: ignore[arg-type]
    running.call("dev_del", name="d0")
    with pytest.raises(RpcError) as caught:
        running.call("dev_del", name="d0")
    assert caught.value.code == NO_SUCH_DEVICE


def test_garbage_on_the_control_socket(running: Running) -> None:
    before = running.fds()
    replies = _raw(
        running.control,
        b"not json\n"
        b'{"jsonrpc":"2.0","id":1,"method":"frobnicate"}\n'
        b'{"jsonrpc":"2.0","id":2,"method":"dev_show","params":{"name":7}}\n'
        b'{"jsonrpc":"2.0","id":3,"method":"dev_vstats_show","params":{"name":"x"}}\n'
        b'{"jsonrpc":"2.0","id":4,"method":"dev_vstats_show","params":{"name":"x","qidx":true}}\n'
        b'[{"jsonrpc":"2.0","id":5,"method":"stats"}]\n'
        b'{"jsonrpc":"2.0","method":"stats"}\n'
        b"\n"
        b'{"jsonrpc":"2.0","id":6,"method":"stats"}\n',
    )
    codes = [reply.get("error", {}).get("code") for reply in replies]  # type: ignore[union-attr]
    assert codes == [
        PARSE_ERROR, METHOD_NOT_FOUND, INVALID_PARAMS, INVALID_PARAMS, INVALID_PARAMS,
        INVALID_REQUEST, None,
    ]  # fmt: skip
    assert [reply["id"] for reply in replies] == [None, 1, 2, 3, 4, None, 6]
    assert replies[-1]["result"] == {"devices": {}}
    # A huge message: one error object, then the connection is closed.
    huge = _raw(running.control, b'{"jsonrpc":"2.0","id":1,"method":"' + b"x" * MAX_MESSAGE)
    assert [r["error"]["code"] for r in huge] == [INVALID_REQUEST]  # type: ignore[index]
    # Clients that go away mid-line and mid-request.
    for payload in (b'{"jsonrpc":"2.0",', encode_request(1, "mgmtdev_show", {})):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(running.control))
            sock.sendall(payload)
    # Many clients at once: each gets its answer.
    results: list[object] = []

    def one() -> None:
        results.append(running.call("mgmtdev_show"))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 24 and all(r == results[0] for r in results)
    # No descriptor leaked (fewer is fine: an earlier test's client may close late).
    deadline = time.monotonic() + 5
    while running.fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.fds() <= before
    assert running.proc.poll() is None


def test_too_many_clients_get_an_error_object(running: Running) -> None:
    held = []
    try:
        for _ in range(32):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(running.control))
            held.append(sock)
        # Every one accepted (answered) before the one too many.
        for sock in held:
            sock.sendall(encode_request(1, "dev_show", {}))
            assert json.loads(sock.recv(4096))["result"] == {}
        replies = _raw(running.control, b"")
        assert replies[0]["error"]["message"] == "too many clients (32)"  # type: ignore[index]
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert running.call("dev_show") == {}


def test_a_second_run_on_the_same_control_path_is_refused(running: Running) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "run", "--control", str(running.control)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        f"pyvdpa: error: control socket {running.control} is in use by another pyvdpa run "
        "(give another --control PATH)\n"
    )
    assert running.call("dev_show") == {}


def test_other_users_cannot_connect(running: Running) -> None:
    assert running.control.stat().st_mode & 0o777 == 0o600
    assert running.control.stat().st_uid == os.geteuid()
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        " s.connect(sys.argv[1])\n"
        ' s.sendall(b\'{"jsonrpc":"2.0","id":1,"method":"stats"}\\n\')\n'
        " print(s.recv(4096).decode())\n"
        "except PermissionError: print('EACCES')\n"
    )
    nobody = subprocess.run(
        [SYSTEM_PYTHON, "-c", probe, str(running.control)],
        user=NOBODY, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert nobody.stdout.strip() == "EACCES", nobody.stderr
    # Even on a socket made reachable by mistake, the peer's uid is checked.
    os.chmod(running.control, 0o666)
    parent_mode = running.dir.stat().st_mode
    os.chmod(running.dir, 0o755)
    try:
        nobody = subprocess.run(
            [SYSTEM_PYTHON, "-c", probe, str(running.control)],
            user=NOBODY, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.chmod(running.control, 0o600)
        os.chmod(running.dir, parent_mode)
    reply = json.loads(nobody.stdout)
    assert (
        reply["error"]["message"]
        == f"permission denied: uid {NOBODY} may not use this control socket"
    )


def test_client_without_a_server_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dev", "show", "--control", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyvdpa: error: cannot connect to control socket ")
    assert err.endswith("(is pyvdpa run serving it?)\n") and err.count("\n") == 1


# ---------------------------------------------------------------------- the console


def test_console_runs_the_same_operations(sock_dir: Path) -> None:
    app = VdpaApp(out=io.StringIO(), socket_dir=sock_dir)
    try:
        lines = [
            "mgmtdev show sim-blk",
            f"dev add name c0 mgmtdev sim-blk size 1M readonly socket {sock_dir / 'c0.sock'}",
            "dev show c0",
            "dev -j config show c0",
            "dev vstats show c0 qidx 0",
            "dev add name c0 mgmtdev sim-blk size 1M",
            "dev del c0",
            "dev show",
        ]
        Console(app, io.StringIO("".join(f"{line}\n" for line in lines))).run()
        assert isinstance(app.out, io.StringIO)
        chunks = app.out.getvalue().split(PROMPT)[1:]
    finally:
        app.close()
    mgmtdev, add, show, config, vstats, again, delete, empty, _ = chunks
    assert mgmtdev.splitlines()[0] == "sim-blk: "
    assert "  supported_type sim-blk device_api virtio-blk available_instances 128" in mgmtdev
    assert "VHOST_CONFIG:" in add
    assert show.strip() == (
        f"c0: type block mgmtdev sim-blk vendor_id 0 max_vqs 1 max_vq_size 32768 "
        f"bus vhost-user socket {sock_dir / 'c0.sock'} role server connected false"
    )
    assert json.loads(config) == {
        "config": {
            "c0": {
                "capacity": 2048,
                "blk_size": 512,
                "read_only": True,
                "num_queues": 1,
                "seg_max": 126,
            }
        }
    }
    assert vstats.startswith(
        "c0: queue_index 0 queue_type request received_desc 0 completed_desc 0"
    )
    assert again.strip() == "c0: cannot register: a device of that name exists"
    assert "device c0 deleted" in delete
    assert empty == "\n" or empty == ""


def test_client_role_and_vduse_refusal(running: Running) -> None:
    sock = running.dir / "listen.sock"
    found: list[Frontend] = []
    waiter = threading.Thread(target=lambda: found.append(Frontend.listen(sock, timeout=30)))
    waiter.start()
    wait_for(sock.exists, timeout=10)
    code, _, err = running.cli(
        "dev", "add", "name", "cli0", "mgmtdev", "sim-blk", "size", "1M", "socket", str(sock),
        "client",
    )  # fmt: skip
    assert code == 0, err
    waiter.join(30)
    with Session(found[0], memory_size=8 << 20) as blk:
        result = run_blk(blk, rw="randwrite", bs=4096, iodepth=4, verify=True, ios=32)
        assert result.errors == result.verify_errors == 0
        shown = running.call("dev_show", name="cli0")
        assert shown["cli0"]["role"] == "client"  # type: ignore[index]
        assert shown["cli0"]["connected"] is True  # type: ignore[index]
    running.call("dev_del", name="cli0")
    if not Path("/dev/vduse/control").exists():
        with pytest.raises(RpcError) as caught:
            running.call("dev_add", name="vd0", mgmtdev="sim-blk", size="1M", bus="vduse")
        assert caught.value.code == -32000 and "vduse" in caught.value.message
    with pytest.raises(RpcError) as caught:
        running.call(
            "dev_add", name="vd0", mgmtdev="sim-blk", size="1M", bus="vduse", socket="/tmp/x"
        )
    assert caught.value.code == INVALID_PARAMS
    assert running.call("dev_show") == {}


def test_openmetrics_rendering_and_addresses() -> None:
    stats: dict[str, object] = {
        "devices": {
            'n"0': {
                "mgmtdev": "sim-net",
                "bus": "vhost-user",
                "queues": [
                    {"queue_index": 0, "queue_type": "rx", "received_desc": 3, "packets": 2},
                    {"queue_index": 1, "queue_type": "tx", "received_desc": 5, "packets": 4},
                ],
            }
        }
    }
    text = render_openmetrics(stats)
    assert text.splitlines() == [
        "# TYPE pyvdpa_devices gauge",
        "# HELP pyvdpa_devices Devices this pyvdpa run serves.",
        "pyvdpa_devices 1",
        "# TYPE pyvdpa_queue_received_desc counter",
        "# HELP pyvdpa_queue_received_desc Per-queue received_desc (dev vstats show).",
        'pyvdpa_queue_received_desc_total{device="n\\"0",mgmtdev="sim-net",queue="0",'
        'queue_type="rx"} 3',
        'pyvdpa_queue_received_desc_total{device="n\\"0",mgmtdev="sim-net",queue="1",'
        'queue_type="tx"} 5',
        "# TYPE pyvdpa_queue_packets counter",
        "# HELP pyvdpa_queue_packets Per-queue packets (dev vstats show).",
        'pyvdpa_queue_packets_total{device="n\\"0",mgmtdev="sim-net",queue="0",queue_type="rx"} 2',
        'pyvdpa_queue_packets_total{device="n\\"0",mgmtdev="sim-net",queue="1",queue_type="tx"} 4',
        "# EOF",
    ]
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_address("[::1]:9") == ("::1", 9)
    for bad in ("x", "1:99999", "host:"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_address(bad)


def test_add_and_delete_cycles_leak_no_fd(running: Running) -> None:
    def cycle() -> None:
        for name, params in (
            ("cyc-blk", {"mgmtdev": "sim-blk", "size": "1M", "queues": 2}),
            ("cyc-net", {"mgmtdev": "sim-net", "max_vqp": 2, "mode": "drop"}),
        ):
            running.call("dev_add", name=name, **params)
            with Session(Frontend.connect(running.dir / f"{name}.sock"), memory_size=4 << 20):
                pass
            running.call("dev_del", name=name)

    cycle()  # the first loads the programs and starts the engine's workers
    before = running.fds()
    for _ in range(3):
        cycle()
    # No descriptor leaked (fewer is fine: an earlier test's client may close late).
    deadline = time.monotonic() + 5
    while running.fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.fds() <= before
    assert running.call("dev_show") == {}


def test_console_and_socket_share_one_device_table(sock_dir: Path) -> None:
    control = sock_dir / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvdpa", "run", "-i", "--control", str(control)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(control.exists, timeout=60)
        with ControlClient(control) as client:
            client.call("dev_add", {"name": "s0", "mgmtdev": "sim-blk", "size": "1M"})
        out, err = proc.communicate("dev show s0\nlist\nstats s0 0\ndev -j del s0\nquit\n", 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    chunks = out.split(PROMPT)
    show, listing, stats, delete, end = chunks[1:]
    assert end.strip() == ""
    # The socket's dev add logged its lines meanwhile; the console's answer comes last.
    assert "device s0 added (mgmtdev sim-blk)" in show
    assert show.strip().splitlines()[-1] == (
        "s0: type block mgmtdev sim-blk vendor_id 0 max_vqs 1 max_vq_size 32768 "
        f"bus vhost-user socket {sock_dir / 's0.sock'} role server connected false"
    )
    assert listing.splitlines()[1].startswith("s0\t\t1\t\t0x")
    assert "\tVirtq 0:" in stats
    assert "device s0 deleted" in delete
    assert not control.exists() and not (sock_dir / "s0.sock").exists()


def test_a_full_table_has_no_available_instances(sock_dir: Path) -> None:
    manager = Manager(log=lambda line: None, socket_dir=sock_dir, registry=VdpaRegistry(1))
    try:

        def request(method: str, **params: object) -> object:
            return call(manager, Request(method, params, 1))

        request("dev_add", name="only", mgmtdev="sim-blk", size="64K")
        shown = request("mgmtdev_show", name="sim-net")
        assert shown["sim-net"]["supported_types"]["sim-net"]["available_instances"] == 0  # type: ignore[index]
        with pytest.raises(RpcError) as caught:
            request("dev_add", name="more", mgmtdev="sim-net")
        assert caught.value.code == NO_INSTANCES
        assert caught.value.message == "sim-net: no available instances (1 devices)"
        request("dev_del", name="only")
        shown = request("mgmtdev_show")
        assert shown["sim-net"]["supported_types"]["sim-net"]["available_instances"] == 1  # type: ignore[index]
    finally:
        manager.close()
