"""The vhost-vdpa session and ``pyvdpa drive|info --vhost-vdpa`` on this host, without the kernel.

This machine's kernel has no vhost_vdpa (the guest tests drive the real
one): :class:`FakeKernel` answers the ioctls and IOTLB writes of
:class:`~pyvdpa.vhost_vdpa.device.VhostVdpaDevice` at the request level,
so the real device class encodes and decodes every argument, and records
what it was asked.  The tests check the order the session speaks in (owner,
back-end features, status sequence, IOTLB batch inside the IOVA range,
rings, DRIVER_OK, bases on stop, reset and unmap on exit), the vIOMMU
remapping of ``--iommu``, and each one-line error a user can meet: not a
vhost-vdpa device, permission denied, FEATURES_OK refused, IOTLB update
refused, IOVA range too small, device type not the subcommand's.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvdpa import cli
from pyvdpa.drive.blk import BLK_WANTED
from pyvdpa.drive.session import GPA_BASE, IOVA_OFFSET
from pyvdpa.drive.vhost_vdpa import REMAP_CHUNK, VdpaSession
from pyvdpa.errors import ConfigError
from pyvdpa.vhost_vdpa import device as device_module
from pyvdpa.vhost_vdpa.device import VhostVdpaDevice
from pyvdpa.vhost_vdpa.uapi import (
    U8,
    U16,
    U32,
    U64,
    BackendFeature,
    FeaturesRefusedError,
    Ioctl,
    IotlbType,
    IovaRange,
    MsgV2,
    VdpaConfig,
    VringState,
)
from pyvdpa.virtio.blk import BlkConfig
from pyvdpa.virtio.constants import BlkFeature, DeviceId, DeviceStatus, VirtioFeature

pytestmark = pytest.mark.usefixtures("no_fd_leak")

OFFERED = VirtioFeature.VERSION_1 | VirtioFeature.ACCESS_PLATFORM | BlkFeature.SEG_MAX
KERNEL_BACKEND = (
    BackendFeature.IOTLB_MSG_V2
    | BackendFeature.IOTLB_BATCH
    | BackendFeature.IOTLB_ASID
    | BackendFeature.SUSPEND
    | BackendFeature.RESUME
    | BackendFeature.IOTLB_PERSIST
)
FULL_RANGE = IovaRange(0, (1 << 64) - 1)
_SCALARS = {
    Ioctl.VHOST_GET_BACKEND_FEATURES: U64,
    Ioctl.VHOST_GET_FEATURES: U64,
    Ioctl.VHOST_VDPA_GET_DEVICE_ID: U32,
    Ioctl.VHOST_VDPA_GET_VRING_NUM: U16,
    Ioctl.VHOST_VDPA_GET_CONFIG_SIZE: U32,
    Ioctl.VHOST_VDPA_GET_VQS_COUNT: U32,
    Ioctl.VHOST_VDPA_GET_STATUS: U8,
}
_SETTERS = {
    Ioctl.VHOST_SET_BACKEND_FEATURES: U64,
    Ioctl.VHOST_SET_FEATURES: U64,
    Ioctl.VHOST_VDPA_SET_STATUS: U8,
    Ioctl.VHOST_VDPA_SET_CONFIG_CALL: U32,
}


class FakeKernel(VhostVdpaDevice):
    """A vhost-vdpa device answered in this process; ``calls`` records every request."""

    def __init__(
        self,
        *,
        device_id: int = DeviceId.BLOCK,
        features: int = OFFERED,
        backend: BackendFeature = KERNEL_BACKEND,
        iova: IovaRange = FULL_RANGE,
        refuse_features_ok: bool = False,
        refuse_iotlb: bool = False,
    ) -> None:
        super().__init__(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), path="/dev/vhost-vdpa-7")
        self.values = {
            Ioctl.VHOST_GET_BACKEND_FEATURES: int(backend),
            Ioctl.VHOST_GET_FEATURES: features,
            Ioctl.VHOST_VDPA_GET_DEVICE_ID: device_id,
            Ioctl.VHOST_VDPA_GET_VRING_NUM: 256,
            Ioctl.VHOST_VDPA_GET_CONFIG_SIZE: BlkConfig.SIZE,
            Ioctl.VHOST_VDPA_GET_VQS_COUNT: 1 if device_id == DeviceId.BLOCK else 2,
            Ioctl.VHOST_VDPA_GET_STATUS: 0,
        }
        self.config = BlkConfig(capacity=2048, seg_max=126).encode()
        self.iova = iova
        self.refuse_features_ok = refuse_features_ok
        self.refuse_iotlb = refuse_iotlb
        self.calls: list[tuple[str, object]] = []
        self.mapped: dict[int, int] = {}

    def _ioctl(self, request: Ioctl, arg: bytearray | None = None) -> None:
        if request in _SCALARS:
            assert arg is not None
            arg[:] = _SCALARS[request].pack(self.values[request])
            return
        value: object = None
        if request in _SETTERS:
            assert arg is not None
            value = _SETTERS[request].unpack(arg)[0]
            if request is Ioctl.VHOST_VDPA_SET_STATUS:
                kept = int(value)  # type: ignore[call-overload]
                if self.refuse_features_ok:
                    kept &= ~DeviceStatus.FEATURES_OK
                self.values[Ioctl.VHOST_VDPA_GET_STATUS] = kept
        elif request is Ioctl.VHOST_VDPA_GET_IOVA_RANGE:
            assert arg is not None
            arg[:] = self.iova.encode()
        elif request is Ioctl.VHOST_VDPA_GET_CONFIG:
            assert arg is not None
            head = VdpaConfig.decode(arg)
            arg[8:] = self.config[head.offset : head.offset + len(head.data)]
        elif request is Ioctl.VHOST_GET_VRING_BASE:
            assert arg is not None
            index = VringState.decode(arg).index
            arg[:] = VringState(index, 5).encode()
            value = index
        elif arg is not None:
            value = bytes(arg)
        self.calls.append((request.name, value))

    def _send(self, msg: MsgV2) -> None:
        msg.check_features(self.backend_features)
        m = msg.iotlb
        if self.refuse_iotlb and m.type is IotlbType.UPDATE:
            raise device_module._iotlb_error(self.path, msg, OSError(errno.EFAULT, "Bad address"))
        if m.type is IotlbType.UPDATE:
            assert self.iova.contains(m.iova, m.size), hex(m.iova)
            assert not any(a < m.iova + m.size and m.iova < a + n for a, n in self.mapped.items())
            self.mapped[m.iova] = m.size
        elif m.type is IotlbType.INVALIDATE:
            assert self.mapped.pop(m.iova) == m.size
        self.calls.append((m.type.name, (m.iova, m.size)))

    def names(self) -> list[str]:
        """The requests made, in order, by name."""
        return [name for name, _ in self.calls]


def _status_writes(kernel: FakeKernel) -> list[int]:
    return [int(v) for n, v in kernel.calls if n == "VHOST_VDPA_SET_STATUS"]  # type: ignore[call-overload]


def _start_blk(kernel: FakeKernel, **options: object) -> VdpaSession:
    session = VdpaSession(kernel, memory_size=4 << 20, **options)  # type: ignore[arg-type]
    session.negotiate(BLK_WANTED, VirtioFeature.VERSION_1, device=DeviceId.BLOCK)
    session.setup_ring(0, 128)
    session.enable_rings()
    return session


def test_session_speaks_in_the_kernel_order() -> None:
    kernel = FakeKernel()
    session = _start_blk(kernel)
    assert session.stop() == [5]
    session.close()
    names = kernel.names()
    assert names[:2] == ["VHOST_SET_OWNER", "VHOST_SET_BACKEND_FEATURES"]
    acked = dict(kernel.calls)["VHOST_SET_BACKEND_FEATURES"]
    # What the kernel offers among ASID, SUSPEND and RESUME, never IOTLB_PERSIST.
    assert acked == KERNEL_BACKEND & ~BackendFeature.IOTLB_PERSIST
    ack, drv, fok = DeviceStatus.ACKNOWLEDGE, DeviceStatus.DRIVER, DeviceStatus.FEATURES_OK
    assert _status_writes(kernel) == [0, ack, ack | drv, ack | drv | fok, ack | drv | fok | 4, 0]
    features = dict(kernel.calls)["VHOST_SET_FEATURES"]
    assert features == OFFERED  # PROTOCOL_FEATURES and the like never reach the device
    begin = names.index("BATCH_BEGIN")
    assert names[begin : begin + 3] == ["BATCH_BEGIN", "UPDATE", "BATCH_END"]
    assert names.index("VHOST_SET_FEATURES") < begin
    assert kernel.calls[begin + 1][1] == (GPA_BASE, 4 << 20)
    ring = [n for n in names if "VRING" in n and n != "VHOST_GET_VRING_BASE"]
    assert ring == [
        "VHOST_SET_VRING_NUM", "VHOST_SET_VRING_BASE", "VHOST_SET_VRING_ADDR",
        "VHOST_SET_VRING_KICK", "VHOST_SET_VRING_CALL", "VHOST_VDPA_SET_VRING_ENABLE",
    ]  # fmt: skip
    assert "VHOST_VDPA_SET_CONFIG_CALL" in names
    stop = names.index("VHOST_VDPA_SUSPEND")
    assert names[stop + 1] == "VHOST_GET_VRING_BASE"
    # On exit: reset, then every mapping withdrawn.
    assert names[-4:] == ["VHOST_VDPA_SET_STATUS", "BATCH_BEGIN", "INVALIDATE", "BATCH_END"]
    assert kernel.mapped == {} and kernel.closed


def test_iommu_places_memory_away_and_remaps_chunks() -> None:
    kernel = FakeKernel()
    with _start_blk(kernel, iommu=True) as session:
        assert session.dma_base == GPA_BASE + IOVA_OFFSET
        assert sorted(kernel.mapped.items()) == [
            (session.dma_base + i * REMAP_CHUNK, REMAP_CHUNK) for i in range(4)
        ]
        kernel.calls.clear()
        session._next_remap = 0.0
        session.tick()
        assert kernel.names() == ["BATCH_BEGIN", "INVALIDATE", "UPDATE", "BATCH_END"]
        assert session.iotlb_remaps == 1
        session.tick()  # before REMAP_INTERVAL: nothing
        assert session.iotlb_remaps == 1
        hole = session.dma_base + 2 * REMAP_CHUNK
        session.unmap(hole, REMAP_CHUNK)
        assert hole not in kernel.mapped and len(kernel.mapped) == 3
    assert kernel.mapped == {}


def test_iommu_never_remaps_a_chunk_holding_a_buffer_in_flight() -> None:
    # A device may translate a buffer's address until it returns the chain:
    # remapping its chunk then opens a window in which the lookup fails.
    kernel = FakeKernel()
    with _start_blk(kernel, iommu=True) as session:
        ring = session.rings[0]
        chunks = sorted(kernel.mapped)
        # Buffers in chunks 1 and 3 (one straddling into chunk 2).
        ring.add([(chunks[1] + 64, 16)], [(chunks[3] - 8, 16)])
        held = {chunks[1], chunks[2], chunks[3]}
        remapped = []
        for _ in range(8):
            kernel.calls.clear()
            session._next_remap = 0.0
            session.tick()
            remapped += [iova for name, (iova, _) in kernel.calls if name == "INVALIDATE"]
        assert remapped and set(remapped) == {chunks[0]}
        assert session.iotlb_remaps == 8
        # Every chunk busy: no remap at all this tick.
        ring.add([(chunks[0], 16)], [])
        kernel.calls.clear()
        session._next_remap = 0.0
        session.tick()
        assert kernel.calls == [] and session.iotlb_remaps == 8
        assert held <= set(kernel.mapped)


def test_remap_idle_waits_for_the_device_to_return_every_chain() -> None:
    kernel = FakeKernel()
    with _start_blk(kernel, iommu=True, remap_idle=True) as session:
        ring = session.rings[0]
        assert not ring.in_flight
        session._next_remap = 0.0
        assert session.quiescing()
        head = ring.add([(session.dma_base + 64, 16)], [])
        kernel.calls.clear()
        session.tick()  # a chain in flight: no remap, still quiescing
        assert kernel.calls == [] and session.iotlb_remaps == 0 and session.quiescing()
        ring.in_flight.pop(head)
        session.tick()
        assert session.iotlb_remaps == 1 and not session.quiescing()


def test_remap_idle_needs_iommu_and_vhost_vdpa(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["drive", "blk", "--remap-idle", "--duration", "1"]
    assert cli.main([*common, "--vhost-vdpa", "/dev/null"]) == 2
    assert "--remap-idle applies with --iommu only" in capsys.readouterr().err
    assert cli.main([*common, "--socket", "/nonexistent.sock", "--iommu"]) == 2
    assert "--remap-idle applies to --vhost-vdpa only" in capsys.readouterr().err


def test_features_ok_refused() -> None:
    kernel = FakeKernel(refuse_features_ok=True)
    session = VdpaSession(kernel, memory_size=1 << 20)
    with session, pytest.raises(FeaturesRefusedError, match="refused FEATURES_OK") as caught:
        session.negotiate(BLK_WANTED, VirtioFeature.VERSION_1)
    assert "\n" not in str(caught.value)
    # FAILED was written once the device refused, before the reset of the exit.
    assert _status_writes(kernel)[-2] & DeviceStatus.FAILED
    assert _status_writes(kernel)[-1] == 0


def test_missing_backend_features_refused() -> None:
    kernel = FakeKernel(backend=BackendFeature.IOTLB_MSG_V2)
    with pytest.raises(ConfigError, match="does not offer the back-end features"):
        VdpaSession(kernel, memory_size=1 << 20)
    assert kernel.closed


def test_ring_larger_than_the_device_allows() -> None:
    kernel = FakeKernel()
    with VdpaSession(kernel, memory_size=4 << 20) as session:
        session.negotiate(BLK_WANTED, VirtioFeature.VERSION_1)
        with pytest.raises(ConfigError, match="at most 256 descriptors, 512 asked"):
            session.setup_ring(0, 512)
        assert _status_writes(kernel)[-1] & DeviceStatus.FAILED


@pytest.fixture
def fake_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeKernel]]:
    """``VhostVdpaDevice.open`` gives the next FakeKernel of the list yielded."""
    kernels: list[FakeKernel] = []
    monkeypatch.setattr(VhostVdpaDevice, "open", classmethod(lambda cls, path: kernels.pop(0)))
    yield kernels
    for kernel in kernels:
        kernel.close()


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("fake", "kind", "code", "message"),
    [
        (
            {"refuse_features_ok": True},
            "blk",
            1,
            "pyvdpa: error: the device refused FEATURES_OK: it does not accept the features",
        ),
        (
            {"refuse_iotlb": True},
            "blk",
            1,
            "pyvdpa: error: IOTLB UPDATE [0x40000000, +0x4000000) in address space 0 refused "
            "by /dev/vhost-vdpa-7: outside the IOVA range",
        ),
        (
            {"iova": IovaRange(0x1000, 0x3FFFFF)},
            "blk",
            2,
            "pyvdpa: error: /dev/vhost-vdpa-7: the IOVA range [0x1000, 0x3fffff] cannot hold "
            "the 67108864 bytes of memory asked for (--memory)",
        ),
        (
            {"device_id": DeviceId.BLOCK},
            "net",
            2,
            "pyvdpa: error: /dev/vhost-vdpa-7 is a virtio blk device, not net",
        ),
        (
            {"device_id": DeviceId.NET},
            "blk",
            2,
            "pyvdpa: error: /dev/vhost-vdpa-7 is a virtio net device, not blk",
        ),
    ],
    ids=["features-ok-refused", "iotlb-refused", "iova-range-small", "blk-as-net", "net-as-blk"],
)
def test_drive_errors_are_one_line(
    fake_open: list[FakeKernel],
    capsys: pytest.CaptureFixture[str],
    fake: dict[str, Any],
    kind: str,
    code: int,
    message: str,
) -> None:
    kernel = FakeKernel(**fake)
    fake_open.append(kernel)
    status, lines = _main(capsys, "drive", kind, "--vhost-vdpa", "/dev/vhost-vdpa-7")
    assert status == code
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert kernel.closed


def test_vhost_user_only_options_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--server", "--inband"):
        status, lines = _main(capsys, "drive", "net", "--vhost-vdpa", "/dev/x", option)
        assert status == 2
        assert lines == [f"pyvdpa: error: {option} applies to vhost-user only, not --vhost-vdpa"]


def test_info_reports_a_fake_device(
    fake_open: list[FakeKernel], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_open.append(FakeKernel(iova=IovaRange(0x1000, 0xFFFF_FFFF)))
    assert cli.main(["info", "--vhost-vdpa", "/dev/vhost-vdpa-7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "vhost-vdpa /dev/vhost-vdpa-7"
    fields = {line.split()[0]: line.split(None, 1)[1] for line in out[1:]}
    assert fields["device_type"] == "blk"
    assert fields["feature_names"] == "SEG_MAX, VERSION_1, ACCESS_PLATFORM"
    assert fields["iova_first"] == "0x1000" and fields["iova_last"] == "0xffffffff"
    assert "capacity=2048" in fields["config"] and "seg_max=126" in fields["config"]


def _pyvdpa(*args: str, prefix: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "pyvdpa", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/dev/null", "/dev/null is not a vhost-vdpa device: it does not answer"),
        ("{tmp}/file", "{tmp}/file is not a vhost-vdpa device: not a character device"),
        ("{tmp}", "{tmp} is not a vhost-vdpa device: not a character device"),
        ("{tmp}/none", "{tmp}/none: no such device (is the vDPA device bound to vhost_vdpa?)"),
    ],
    ids=["char-device", "file", "directory", "missing"],
)
@pytest.mark.parametrize("command", ["info", "drive net", "drive blk"])
def test_not_a_vhost_vdpa_device(tmp_path: Path, path: str, message: str, command: str) -> None:
    (tmp_path / "file").write_bytes(b"")
    target = path.format(tmp=tmp_path)
    status, lines = _pyvdpa(*command.split(), "--vhost-vdpa", target)
    assert status == 2
    assert lines == [f"pyvdpa: error: {message.format(tmp=tmp_path)}"] or (
        len(lines) == 1 and lines[0].startswith(f"pyvdpa: error: {message.format(tmp=tmp_path)}")
    )


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv is missing")
def test_permission_denied(tmp_path: Path) -> None:
    """A node this process may not open read-write: root without CAP_DAC_OVERRIDE."""
    node = tmp_path / "vhost-vdpa-9"
    os.mknod(node, 0o000 | 0o020000, os.makedev(1, 3))
    caps = "-dac_override,-dac_read_search"
    prefix = ("setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--")
    for command in (("info",), ("drive", "blk")):
        status, lines = _pyvdpa(*command, "--vhost-vdpa", str(node), prefix=prefix)
        assert status == 1
        assert lines == [
            f"pyvdpa: error: {node}: permission denied "
            "(a vhost-vdpa device must be opened read-write)"
        ]
