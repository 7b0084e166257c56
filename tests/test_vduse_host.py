"""The VDUSE control plane's checks that need no kernel with VDUSE.

What the kernel refuses at VDUSE_CREATE_DEV is never offered
(:func:`~pyvdpa.vduse.backend.vduse_features`), a net device with more than
one queue pair is refused before anything is created, and a kernel without
VDUSE is one clear line from ``pyvdpa run`` before the data path loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyvdpa.dataplane.blk import EngineBlkDevice
from pyvdpa.dataplane.net import EngineNetDevice
from pyvdpa.devices.blk import BlkDevice
from pyvdpa.devices.net import NetDevice
from pyvdpa.vduse.backend import VduseBackend, vduse_features
from pyvdpa.vduse.uapi import DeviceConfig, VduseConfigError, validate_device_config
from pyvdpa.virtio.constants import BlkFeature, DeviceId, NetFeature, VirtioFeature

CONTROL = Path("/dev/vduse/control")


@pytest.mark.parametrize("kind", ["net", "blk"])
def test_offered_features_pass_the_kernels_checks(kind: str, tmp_path: Path) -> None:
    device = NetDevice() if kind == "net" else BlkDevice(size=1 << 20)
    features = vduse_features(device)
    assert features & VirtioFeature.VERSION_1
    assert features & VirtioFeature.ACCESS_PLATFORM
    assert not features & VirtioFeature.RING_PACKED
    assert not features & (VirtioFeature.PROTOCOL_FEATURES | VirtioFeature.LOG_ALL)
    assert not features & NetFeature.CTRL_VQ
    if kind == "blk":
        assert not features & BlkFeature.CONFIG_WCE
    config = DeviceConfig(
        "x", 0, int(device.device_id), features, device.num_queues, 4096,
        device.get_config(0, device.config_size),
    )  # fmt: skip
    validate_device_config(config)


def test_the_engine_devices_declare_their_identity(tmp_path: Path) -> None:
    net = EngineNetDevice(mode="drop")
    blk = EngineBlkDevice(size=1 << 20)
    try:
        assert net.device_id is DeviceId.NET and net.config_size > 0
        assert blk.device_id is DeviceId.BLOCK and blk.config_size > 0
        assert len(net.get_config(0, net.config_size)) == net.config_size
    finally:
        net.close()
        blk.close()


def test_a_net_device_with_two_queue_pairs_is_refused() -> None:
    with pytest.raises(VduseConfigError, match="one queue pair"):
        VduseBackend(NetDevice(queue_pairs=2), "mq")


@pytest.mark.skipif(CONTROL.exists(), reason="this kernel has VDUSE")
def test_a_kernel_without_vduse_is_one_line_before_the_data_path_loads() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "run", "--vdev", "sim-blk,size=1M,bus=vduse"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "pyvdpa: error: no /dev/vduse/control: load the vduse module (Linux 5.15+) (ENOENT)"
    ]


def test_an_unknown_bus_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pyvdpa", "run", "--vdev", "sim-net,bus=pci"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bus=pci is not one of vhost-user, vduse" in proc.stderr
