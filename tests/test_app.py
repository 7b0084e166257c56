"""``pyvdpa run``, the vDPA example app: console, signals, client mode, bad input."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvdpa.app import PROMPT, Console, VdpaApp
from pyvdpa.cli import main
from pyvdpa.dataplane.engine import WORKER_THREAD_PREFIX
from pyvdpa.drive.blk import run_blk
from pyvdpa.drive.net import run_net
from pyvdpa.drive.session import Session
from pyvdpa.vhost_user.frontend import Frontend
from pyvdpa.virtio.constants import VirtioFeature
from test_vdpa_port import wait_for

_ASYNC = re.compile(r"\n(new|destroy) port [^\n]*\n")
_STAT = re.compile(r"^\t\t(\w+) +(\d+)$")


def pyvdpa(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pyvdpa", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def parse_stats(text: str) -> dict[int, dict[str, int]]:
    """``stats`` output -> {queue: {counter: value}}."""
    queues: dict[int, dict[str, int]] = {}
    current: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("\tVirtq "):
            current = queues.setdefault(int(line.split()[1].rstrip(":")), {})
        elif match := _STAT.match(line):
            current[match[1]] = int(match[2])
    return queues


@pytest.fixture
def app(sock_dir: Path) -> Iterator[VdpaApp]:
    application = VdpaApp(out=io.StringIO())
    application.probe(["sim-net,name=net0,queues=2", "sim-blk,name=blk0,size=1M,serial=s1"])
    yield application
    application.close()


def run_console(app: VdpaApp, *lines: str) -> list[str]:
    """Execute ``lines`` at the console; return each command's output."""
    assert isinstance(app.out, io.StringIO)
    start = app.out.tell()
    Console(app, io.StringIO("".join(f"{line}\n" for line in lines))).run()
    app.out.seek(start)
    return _ASYNC.sub("\n", app.out.read()).split(PROMPT)[1:]


# ---------------------------------------------------------------------- the console


def test_interactive_app_through_stdin(sock_dir: Path) -> None:
    sock = sock_dir / "vdpa-net"
    proc = pyvdpa(
        "run", "--vdev", "sim-net,name=net0", "--vdev", "sim-blk,name=blk0,size=1M", "-i",
        stdin=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    try:
        proc.stdin.write(f"help\nlist\ncreate {sock} net0\n")
        proc.stdin.flush()
        wait_for(sock.exists, timeout=60)
        with Session(Frontend.connect(sock), memory_size=4 << 20) as session:
            result = run_net(session, mode="io", duration=0.3)
        assert result.rx_packets > 0
        proc.stdin.write("stats net0 0xFFFF\nstats net0 1\nstats blk0 0\nquit\n")
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert not sock.exists()
    assert f"new port {sock}, device : net0" in out
    assert f"destroy port {sock}, device: net0" in out
    chunks = _ASYNC.sub("\n", out).split(PROMPT)
    assert chunks[0] == "Interactive-mode selected\n"
    help_, list_, create, stats_all, stats_one, stats_blk, end = chunks[1:]
    assert "The following commands are currently available:" in help_
    assert "stats <device name> <virtio queue ID>" in help_
    rows = list_.splitlines()
    assert rows[0] == "device name\tqueue num\tsupported features"
    assert re.fullmatch(r"net0\t\t1\t\t0x[0-9a-f]+", rows[1])
    assert re.fullmatch(r"blk0\t\t1\t\t0x[0-9a-f]+", rows[2])
    assert (
        create.strip() == f"VHOST_CONFIG: ({sock}) vhost-user server: socket created, device net0"
    )
    assert "\nDevice net0:\n" in stats_all
    counters = parse_stats(stats_all)
    assert set(counters) == {0, 1}
    assert list(counters[1]) == [
        "received_desc", "completed_desc", "bad_desc_errors", "exceed_max_chain",
        "invalid_buffer", "completion_errors", "packets", "bytes",
    ]  # fmt: skip
    assert counters[1]["packets"] == result.tx_packets
    assert counters[1]["received_desc"] == counters[1]["completed_desc"] >= result.tx_packets
    assert counters[0]["packets"] >= result.rx_packets
    assert parse_stats(stats_one) == {1: counters[1]}
    assert stats_blk.strip() == "Device blk0 was not created."
    assert end == ""


def test_console_lists_in_registration_order(app: VdpaApp) -> None:
    (listing,) = run_console(app, "list")[:1]
    rows = listing.splitlines()
    assert rows[0] == "device name\tqueue num\tsupported features"
    assert [row.split("\t")[0] for row in rows[1:]] == ["net0", "blk0"]
    assert rows[1].split("\t\t")[1] == "2"  # queue pairs


def test_console_create_and_stats_errors(app: VdpaApp, sock_dir: Path) -> None:
    taken = sock_dir / "taken"
    taken.write_text("")
    outputs = run_console(
        app,
        "",
        "frobnicate",
        "create only-one-arg",
        f"create {sock_dir / 'x'} nope",
        f"create {taken} net0",
        f"create {sock_dir / 'n'} net0",
        f"create {sock_dir / 'again'} net0",
        "stats nope 0",
        "stats blk0 0",
        "stats net0 4",
        "stats net0 lots",
        "stats net0 0x10000",
        "stats net0 3",
    )
    assert [o.strip() for o in outputs[:-1]] == [
        "",
        "Command not found",
        "Bad arguments",
        "Unable to find vdpa device id for nope.",
        f"socket path already exists: {taken}",
        f"VHOST_CONFIG: ({sock_dir / 'n'}) vhost-user server: socket created, device net0",
        f"net0: already attached to {sock_dir / 'n'}",
        "Invalid device: nope.",
        "Device blk0 was not created.",
        "Failed to get vdpa queue statistics for device net0 qid 4: "
        "net0: queue 4 out of range (device has 4 queues)",
        "Bad arguments",
        "Bad arguments",
        "\n".join(["Device net0:", "\tVirtq 3:"])
        + "".join(f"\n\t\t{name:<64} 0" for name in app.registry.get("net0").get_stats_names()),
    ]
    assert outputs[-1] == "\n"  # end of input ends the console
    assert taken.read_text() == ""
    assert [p.path for p in app.ports] == [str(sock_dir / "n")]


def test_app_serves_a_disk_created_at_the_console(app: VdpaApp, sock_dir: Path) -> None:
    sock = sock_dir / "blk"
    run_console(app, f"create {sock} blk0")
    with Session(Frontend.connect(sock), memory_size=4 << 20) as session:
        result = run_blk(session, rw="randwrite", verify=True, duration=0.2, iodepth=4)
    assert result.ios > 0 and result.verify_errors == 0
    (stats,) = run_console(app, "stats blk0 0xffff")[:1]
    assert parse_stats(stats)[0]["completed_desc"] >= result.ios
    app.close()
    assert not sock.exists()
    assert len(app.registry) == 0


def test_app_devices_work_behind_an_iommu(app: VdpaApp, sock_dir: Path) -> None:
    """Through the vDPA framework: ACCESS_PLATFORM offered, misses served, traffic verified."""
    net, blk = sock_dir / "net", sock_dir / "blk"
    run_console(app, f"create {net} net0", f"create {blk} blk0")
    with Session(Frontend.connect(net), memory_size=8 << 20, iommu=True) as session:
        frames = run_net(session, mode="io", duration=0.3)
        assert session.features & VirtioFeature.ACCESS_PLATFORM
    assert frames.rx_packets > 100 and frames.rx_bad == 0 and frames.errors == 0
    assert frames.iotlb_misses > 0
    with Session(Frontend.connect(blk), memory_size=4 << 20, iommu=True) as session:
        ios = run_blk(session, rw="randwrite", verify=True, duration=0.3, iodepth=4)
    assert ios.ios > 0 and ios.verify_errors == 0 and ios.iotlb_misses > 0


# ---------------------------------------------------------------------- signals, roles


def test_sigterm_disconnects_and_removes_sockets(sock_dir: Path) -> None:
    prefix = sock_dir / "s"
    proc = pyvdpa(
        "run", "--vdev", "sim-net,name=n0", "--vdev", "sim-blk,name=b0,size=1M",
        "--iface", str(prefix),
    )  # fmt: skip
    sockets = [Path(f"{prefix}0"), Path(f"{prefix}1")]
    try:
        wait_for(lambda: all(s.exists() for s in sockets), timeout=60)
        session = Session(Frontend.connect(sockets[0]), memory_size=4 << 20)
        with session:
            assert run_net(session, mode="io", duration=0.2).rx_packets > 0
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=15)
            with pytest.raises(Exception):  # noqa: B017 - the back-end is gone
                session.frontend.get_features()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.splitlines()[0] == f"iface {prefix}"
    assert f"VHOST_CONFIG: ({sockets[0]}) vhost-user server: socket created, device n0" in out
    assert f"VHOST_CONFIG: ({sockets[1]}) vhost-user server: socket created, device b0" in out
    assert "Signal 15 received, preparing to exit..." in out
    assert not any(s.exists() for s in sockets)
    assert "Traceback" not in err


def test_client_mode_connects_and_reconnects(sock_dir: Path) -> None:
    prefix = sock_dir / "c"
    proc = pyvdpa("run", "--vdev", "sim-net,name=n0", "--iface", str(prefix), "--client")
    try:
        for _ in range(2):
            frontend = Frontend.listen(f"{prefix}0", timeout=60)
            with Session(frontend, memory_size=4 << 20) as session:
                assert run_net(session, mode="io", duration=0.2).rx_packets > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"VHOST_CONFIG: ({prefix}0) vhost-user client: socket created, device n0" in out
    assert "Signal 2 received" in out


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("vdevs", "message"),
    [
        (["sim-net,bogus=1"], "unknown key 'bogus' for sim-net"),
        (["sim-gen"], "unknown device kind 'sim-gen'"),
        (["sim-net,mtu=abc"], "mtu='abc' is not a number"),
        (["sim-net,queues=0"], "queues=0 out of range"),
        (["sim-net,mode=warp"], "unknown sim-net mode 'warp'"),
        (["sim-net,mac=zz"], "invalid MAC address"),
        (["sim-net,ifname=pv0"], "ifname=pv0 needs mode=tap"),
        (["sim-net,mode=tap,ifname=lo"], "cannot create TAP 'lo'"),
        (["sim-net,mode=tap,ifname=much-too-long-name"], "invalid TAP interface name"),
        (["sim-blk,path=/nonexistent/disk.img"], "disk image not found"),
        (["sim-blk,name=b"], "exactly one of path= or size="),
        (["sim-blk,size=lots"], "invalid size 'lots'"),
        (["sim-blk,size=1M,readonly=maybe"], "readonly='maybe' is not on/off"),
        (["sim-net,name=a", "sim-blk,name=a,size=1M"], "a: cannot register: a device of that"),
    ],
)
def test_bad_vdev_is_one_line_and_nonzero(
    sock_dir: Path, capsys: pytest.CaptureFixture[str], vdevs: list[str], message: str
) -> None:
    argv = ["run", "--iface", str(sock_dir / "s")]
    for vdev in vdevs:
        argv += ["--vdev", vdev]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pyvdpa: error: ")
    assert message in err
    assert list(sock_dir.iterdir()) == []


def test_existing_socket_path_fails_and_cleans_up(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (sock_dir / "s1").write_text("")
    argv = ["run", "--iface", str(sock_dir / "s"), "--vdev", "sim-net", "--vdev", "sim-net"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err == f"pyvdpa: error: socket path already exists: {sock_dir / 's1'}\n"
    assert sorted(p.name for p in sock_dir.iterdir()) == ["s1"]  # s0 was removed again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--vdev", "sim-net"], "--iface PREFIX is required unless -i"),
        (["run", "--iface", "/tmp/x"], "--iface PREFIX names the sockets of --vdev devices"),
        (["run", "--vdev", "sim-net", "--iface"], "expected one argument"),
        (["run", "--vdev", "sim-net", "-i", "--cpus", "1-x"], "invalid CPU list '1-x'"),
        (["run", "--vdev", "sim-net", "-i", "--cpus", "3-1"], "invalid CPU list '3-1'"),
        (["run", "--vdev", "sim-net", "-i", "--cpus", "0,0"], "names a CPU twice"),
        (["run", "--vdev", "sim-net", "-i", "--cpus", "4096"], "this machine has CPUs 0.."),
    ],
)
def test_bad_arguments_are_one_line_and_nonzero(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_bad_input_never_shows_a_traceback(sock_dir: Path) -> None:
    start = time.monotonic()
    proc = pyvdpa("run", "--vdev", "sim-blk,path=/nonexistent", "--iface", str(sock_dir / "s"))
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2
    assert err == "pyvdpa: error: disk image not found: /nonexistent\n"
    assert time.monotonic() - start < 15


def test_cpus_pins_the_data_path_workers(sock_dir: Path) -> None:
    cpu = (os.cpu_count() or 1) - 1
    sock = sock_dir / "net"
    proc = pyvdpa("run", "--vdev", "sim-net", "--cpus", str(cpu), "--iface", str(sock))
    try:
        wait_for(lambda: Path(f"{sock}0").exists(), timeout=60)

        def workers() -> list[set[int]]:
            return [
                os.sched_getaffinity(int(task.name))
                for task in Path(f"/proc/{proc.pid}/task").iterdir()
                if (task / "comm").read_text().startswith(WORKER_THREAD_PREFIX)
            ]

        # The socket may be served a moment before the worker thread starts.
        wait_for(lambda: bool(workers()), timeout=30)
        assert workers() == [{cpu}]
        # The control plane is left to the system.
        assert os.sched_getaffinity(proc.pid) == os.sched_getaffinity(0)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_a_start_loads_only_the_programs_its_devices_run(sock_dir: Path) -> None:
    proc = pyvdpa(
        "-v", "run", "--vdev", "sim-blk,name=blk0,size=1M", "--iface", str(sock_dir / "only"),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for((sock_dir / "only0").exists, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "data path programs loaded: blk\n" in err, err
