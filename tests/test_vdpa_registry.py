"""The vDPA device table and device handle: every registration rule, optional ops."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvdpa.vdev import parse_vdev
from pyvdpa.vdpa import (
    MANDATORY_OPS,
    OPTIONAL_OPS,
    OpNotSupportedError,
    SimBlkDriver,
    SimNetDriver,
    VdpaError,
    VdpaPort,
    VdpaRegistry,
    VhostDevice,
)
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, NetFeature, VirtioFeature


class MinimalOps:
    """Only the mandatory operations, with settable capabilities."""

    def __init__(
        self,
        queue_num: int = 1,
        features: object = VirtioFeature.VERSION_1 | NetFeature.MAC,
        protocol: ProtocolFeature = ProtocolFeature.MQ,
    ) -> None:
        self.queue_num = queue_num
        self.features = features
        self.protocol = protocol

    def get_queue_num(self) -> int:
        return self.queue_num

    def get_features(self) -> int:
        return self.features  # type: ignore[return-value]

    def get_protocol_features(self) -> ProtocolFeature:
        return self.protocol

    def dev_conf(self, vhost: VhostDevice) -> None:
        pass

    def dev_close(self, vhost: VhostDevice) -> None:
        pass

    def set_vring_state(self, vhost: VhostDevice, qid: int, enable: bool) -> None:
        pass

    def set_features(self, vhost: VhostDevice) -> None:
        pass


class TypedOps(MinimalOps):
    """Mandatory operations plus ``get_dev_type`` and statistics."""

    def __init__(self, dev_type: object, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dev_type = dev_type
        self.counters = {"received_desc": 3, "completed_desc": 2}

    def get_dev_type(self) -> object:
        return self.dev_type

    def get_stats_names(self) -> tuple[str, ...]:
        return ("received_desc", "completed_desc")

    def get_stats(self, qid: int) -> Mapping[str, int]:
        return self.counters

    def reset_stats(self, qid: int) -> None:
        self.counters = dict.fromkeys(self.counters, 0)


def _without(op: str) -> object:
    """An ops object lacking ``op``."""
    methods = {name: getattr(MinimalOps, name) for name in MANDATORY_OPS if name != op}
    cls = type(f"Without_{op}", (), {"__init__": MinimalOps.__init__, **methods})
    return cls()


def test_register_find_iterate() -> None:
    registry = VdpaRegistry()
    a = registry.register("a", MinimalOps())
    b = registry.register("b", MinimalOps(queue_num=4))
    assert registry.find("a") is a
    assert registry.get("b") is b
    assert registry.find("c") is None
    assert [d.name for d in registry] == ["a", "b"]
    assert len(registry) == 2
    assert "a" in registry and "c" not in registry
    assert a.device_type is DeviceId.NET
    assert b.capabilities().queue_num == 4
    assert b.capabilities().num_vrings == 8
    with pytest.raises(VdpaError, match="no vDPA device named 'c'"):
        registry.get("c")


@pytest.mark.parametrize("op", MANDATORY_OPS)
def test_register_refuses_missing_mandatory_op(op: str) -> None:
    registry = VdpaRegistry()
    with pytest.raises(VdpaError, match=f"missing mandatory ops {op}"):
        registry.register("dev", _without(op))  # type: ignore[arg-type]
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("ops", "why"),
    [
        (MinimalOps(features=NetFeature.MAC), "no VERSION_1"),
        (MinimalOps(queue_num=0), "no queues"),
        (TypedOps(DeviceId.CONSOLE), "device type CONSOLE"),
    ],
    ids=["no-version-1", "no-queues", "console"],
)
def test_register_refuses_devices_without_enough_capabilities(ops: object, why: str) -> None:
    registry = VdpaRegistry()
    with pytest.raises(VdpaError, match=f"not enough capabilities.*{why}"):
        registry.register("dev", ops)  # type: ignore[arg-type]
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("ops", "op"),
    [
        (MinimalOps(queue_num=-1), "get_queue_num"),
        (MinimalOps(features="all"), "get_features"),
        (TypedOps(99), "get_dev_type"),
    ],
    ids=["negative-queues", "features-not-int", "unknown-type"],
)
def test_register_refuses_faulty_driver_answers(ops: object, op: str) -> None:
    with pytest.raises(VdpaError, match=op):
        VdpaRegistry().register("dev", ops)  # type: ignore[arg-type]


def test_register_refuses_duplicate_names() -> None:
    registry = VdpaRegistry()
    first = registry.register("dev", MinimalOps())
    with pytest.raises(VdpaError, match="a device of that name exists"):
        registry.register("dev", MinimalOps())
    assert registry.get("dev") is first


@pytest.mark.parametrize("name", ["", "two words", "x" * 64, "tab\there"])
def test_register_refuses_unusable_names(name: str) -> None:
    with pytest.raises(VdpaError, match="invalid vDPA device name"):
        VdpaRegistry().register(name, MinimalOps())


def test_register_refuses_when_table_full() -> None:
    registry = VdpaRegistry(max_devices=2)
    registry.register("a", MinimalOps())
    registry.register("b", MinimalOps())
    with pytest.raises(VdpaError, match="device table full \\(2 devices\\)"):
        registry.register("c", MinimalOps())
    registry.unregister("a")
    registry.register("c", MinimalOps())
    assert [d.name for d in registry] == ["b", "c"]


def test_unregister_rules(tmp_path: Any) -> None:
    registry = VdpaRegistry()
    device = registry.register("dev", MinimalOps())
    with pytest.raises(VdpaError, match="no such device"):
        registry.unregister("other")
    port = VdpaPort(tmp_path / "sock")
    port.attach(device)
    with pytest.raises(VdpaError, match=f"attached to {port.path}"):
        registry.unregister(device)
    port.detach()
    registry.unregister(device)
    assert "dev" not in registry
    assert not device.registered
    with pytest.raises(VdpaError, match="not registered"):
        port.attach(device)
    # A new device of the same name is a different device.
    again = registry.register("dev", MinimalOps())
    with pytest.raises(VdpaError, match="no such device"):
        registry.unregister(device)
    registry.unregister(again)


@given(st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=20))
def test_registry_keeps_names_unique_and_bounded(names: list[str]) -> None:
    registry = VdpaRegistry(max_devices=3)
    model: list[str] = []
    for name in names:
        if name in model:
            registry.unregister(name)
            model.remove(name)
        elif len(model) == 3:
            with pytest.raises(VdpaError, match="full"):
                registry.register(name, MinimalOps())
        else:
            registry.register(name, MinimalOps())
            model.append(name)
        assert [d.name for d in registry] == model


@pytest.mark.parametrize("op", OPTIONAL_OPS)
def test_absent_optional_ops_are_reported_as_not_supported(op: str) -> None:
    device = VdpaRegistry().register("plain", MinimalOps())
    assert not device.supports(op)
    calls: dict[str, Any] = {
        "migration_done": lambda: device.migration_done(None),  # type: ignore[arg-type]
        "iotlb_updated": lambda: device.iotlb_updated(None),  # type: ignore[arg-type]
        "iotlb_invalidate": lambda: device.iotlb_invalidate(
            None,  # type: ignore[arg-type]
            0,
            4096,
            lambda: None,
        ),
        "get_notify_area": lambda: device.get_notify_area(None, 0),  # type: ignore[arg-type]
        "get_stats_names": device.get_stats_names,
        "get_stats": lambda: device.get_stats(0),
        "reset_stats": lambda: device.reset_stats(0),
        "get_config": lambda: device.get_config(None, 0, 6),  # type: ignore[arg-type]
        "set_config": lambda: device.set_config(None, 0, b"x"),  # type: ignore[arg-type]
        "get_vfio_group_fd": lambda: device.get_vfio_group_fd(None),  # type: ignore[arg-type]
        "get_vfio_device_fd": lambda: device.get_vfio_device_fd(None),  # type: ignore[arg-type]
    }
    if op == "get_dev_type":
        assert device.device_type is DeviceId.NET
        return
    with pytest.raises(OpNotSupportedError, match=f"plain: {op} not supported"):
        calls[op]()


def test_statistics_through_the_device() -> None:
    ops = TypedOps(DeviceId.BLOCK, queue_num=2)
    device = VdpaRegistry().register("blk", ops)
    assert device.device_type is DeviceId.BLOCK
    assert device.capabilities().num_vrings == 2
    assert device.get_stats_names() == ("received_desc", "completed_desc")
    assert device.get_stats(1) == {"received_desc": 3, "completed_desc": 2}
    device.reset_stats(0)
    assert device.get_stats(0) == {"received_desc": 0, "completed_desc": 0}
    with pytest.raises(VdpaError, match="queue 2 out of range"):
        device.get_stats(2)
    with pytest.raises(VdpaError, match="queue 5 out of range"):
        device.reset_stats(5)


def test_sim_drivers_probe_and_remove(tmp_path: Any) -> None:
    registry = VdpaRegistry()
    net, blk = SimNetDriver(), SimBlkDriver()
    n = net.probe(parse_vdev("sim-net,name=n0,queues=2,mtu=9000"), registry)
    b = blk.probe(parse_vdev("sim-blk,name=b0,size=1M,queues=3"), registry)
    assert (n.device_type, b.device_type) == (DeviceId.NET, DeviceId.BLOCK)
    assert n.capabilities().queue_num == 2 and n.capabilities().num_vrings == 4
    assert b.capabilities().queue_num == 3 and b.capabilities().num_vrings == 3
    assert n.capabilities().features & NetFeature.MQ
    assert n.get_stats_names()[-2:] == ("packets", "bytes")
    assert "packets" not in b.get_stats_names()
    assert n.get_stats(3)["received_desc"] == 0
    with pytest.raises(VdpaError, match="a device of that name exists"):
        blk.probe(parse_vdev("sim-blk,name=n0,size=1M"), registry)
    with pytest.raises(VdpaError, match="not a device of the sim-blk driver"):
        blk.remove(n, registry)
    port = VdpaPort(tmp_path / "sock")
    port.attach(n)
    with pytest.raises(VdpaError, match="attached to"):
        net.remove(n, registry)
    port.detach()
    net.remove(n, registry)
    blk.remove(b, registry)
    assert len(registry) == 0
