"""The back-end's state machines, as tables that refuse what they do not list.

Theory of operation (h11's ``_state.py``): each machine is an enum of states
and a table of legal moves; a move the table does not list raises a typed
:class:`~pyvdpa.errors.RemoteProtocolError` naming the state and the event,
and changes nothing.  Three machines:

* **Connection phase** (vhost-user spec, "Front-end message types",
  SET_OWNER: "Issued when a new connection is established ... a session
  start flag").  Before SET_OWNER only what a front-end needs to decide
  whether to take the device may come: QEMU's ``vhost_user_backend_init``
  sends GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
  GET_MAX_MEM_SLOTS and SET_BACKEND_REQ_FD before ``vhost_dev_init``'s
  SET_OWNER; DPDK's virtio-user sends SET_OWNER first.  Everything that
  configures the device waits for the owner.  SET_OWNER may come again
  (QEMU sends it once per queue pair of a multi-queue net device), and the
  session stays owned across RESET_OWNER and RESET_DEVICE, which reset the
  device, as DPDK and libvhost-user treat them: QEMU goes on without a new
  SET_OWNER after them.
* **Ring lifecycle** ("Ring states"): a ring is started by its kick (a
  SET_VRING_KICK fd or the first in-band VRING_KICK) and stopped by
  GET_VRING_BASE; enabled and disabled by SET_VRING_ENABLE (legal before a
  ring is configured, and again in the state it is in: QEMU enables and
  disables queue pairs as the guest changes their number).  A kick fd may
  be replaced while the ring is started.  SET_VRING_NUM and SET_VRING_BASE
  describe where a *stopped* ring resumes: on a started ring they are
  refused (QEMU's ``vhost_virtqueue_start`` and DPDK's
  ``virtio_user_kick_queue`` send them before the kick, and after
  GET_VRING_BASE when they restart a ring).
* **Device status** (virtio 1.2, section 3.1.1; SET_STATUS): 0 resets; a
  driver sets bits, never clears them but by a reset; each bit needs its
  prerequisites set before or with it (:data:`STATUS_PREREQUISITES`);
  FEATURES_OK only after SET_FEATURES; DEVICE_NEEDS_RESET and reserved
  bits are the device's, never the driver's.  DRIVER_OK does not need
  FEATURES_OK: QEMU's ``vhost_user_dev_start`` adds ACKNOWLEDGE, DRIVER and
  DRIVER_OK to what GET_STATUS gave, and a legacy driver has no FEATURES_OK.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from pyvdpa.errors import RemoteProtocolError
from pyvdpa.vhost_user.protocol import Request
from pyvdpa.virtio.constants import DeviceStatus

__all__ = [
    "DRIVER_STATUS_BITS",
    "OWNERLESS_REQUESTS",
    "PHASE_TRANSITIONS",
    "RING_TRANSITIONS",
    "STATUS_PREREQUISITES",
    "Phase",
    "RingEvent",
    "RingState",
    "next_phase",
    "next_ring_state",
    "next_status",
]


# ---------------------------------------------------------------------- phase


class Phase(enum.Enum):
    """Where a connection stands with respect to its owner."""

    AWAITING_OWNER = "awaiting SET_OWNER"
    OWNED = "owned"


#: What a front-end may send before SET_OWNER (QEMU's vhost_user_backend_init,
#: plus the requests that only read or reset).
OWNERLESS_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.SET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.SET_BACKEND_REQ_FD,
        Request.GET_CONFIG,
        Request.GET_STATUS,
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.RESET_DEVICE,
    }
)


def _phase_table() -> dict[tuple[Phase, Request], Phase]:
    table = {(Phase.AWAITING_OWNER, r): Phase.AWAITING_OWNER for r in OWNERLESS_REQUESTS}
    table[(Phase.AWAITING_OWNER, Request.SET_OWNER)] = Phase.OWNED
    table.update({(Phase.OWNED, r): Phase.OWNED for r in Request})
    return table


#: (phase, request) -> next phase.
PHASE_TRANSITIONS: Mapping[tuple[Phase, Request], Phase] = MappingProxyType(_phase_table())


def next_phase(phase: Phase, request: Request) -> Phase:
    """The phase after ``request``; :class:`RemoteProtocolError` if not listed."""
    try:
        return PHASE_TRANSITIONS[(phase, request)]
    except KeyError:
        raise RemoteProtocolError(f"{request.name} before SET_OWNER") from None


# ---------------------------------------------------------------------- rings


class RingState(enum.Enum):
    """A vring's (started, enabled) pair."""

    STOPPED_DISABLED = (False, False)
    STOPPED_ENABLED = (False, True)
    STARTED_DISABLED = (True, False)
    STARTED_ENABLED = (True, True)

    @property
    def started(self) -> bool:
        """Kicked and not stopped since."""
        return bool(self.value[0])

    @property
    def enabled(self) -> bool:
        """Enabled by SET_VRING_ENABLE (or by SET_FEATURES without protocol features)."""
        return bool(self.value[1])


class RingEvent(enum.Enum):
    """What happens to a vring."""

    KICK_FD = "SET_VRING_KICK"
    KICK = "VRING_KICK"
    GET_BASE = "GET_VRING_BASE"
    ENABLE = "SET_VRING_ENABLE 1"
    DISABLE = "SET_VRING_ENABLE 0"
    SET_NUM = "SET_VRING_NUM"
    SET_BASE = "SET_VRING_BASE"
    RESET = "reset"


def _ring_table() -> dict[tuple[RingState, RingEvent], RingState]:
    table: dict[tuple[RingState, RingEvent], RingState] = {}
    for state in RingState:
        started, enabled = state.value
        # Starting a started ring replaces its kick fd, or is a kick.
        table[(state, RingEvent.KICK_FD)] = RingState((True, enabled))
        table[(state, RingEvent.KICK)] = RingState((True, enabled))
        # Stopping a stopped ring reports where it stands.
        table[(state, RingEvent.GET_BASE)] = RingState((False, enabled))
        table[(state, RingEvent.ENABLE)] = RingState((started, True))
        table[(state, RingEvent.DISABLE)] = RingState((started, False))
        table[(state, RingEvent.RESET)] = RingState.STOPPED_DISABLED
        if not started:
            table[(state, RingEvent.SET_NUM)] = state
            table[(state, RingEvent.SET_BASE)] = state
    return table


#: (state, event) -> next state.  Not listed, hence refused: SET_VRING_NUM and
#: SET_VRING_BASE on a started ring.
RING_TRANSITIONS: Mapping[tuple[RingState, RingEvent], RingState] = MappingProxyType(_ring_table())


def next_ring_state(index: int, state: RingState, event: RingEvent) -> RingState:
    """The state after ``event``; :class:`RemoteProtocolError` if not listed."""
    try:
        return RING_TRANSITIONS[(state, event)]
    except KeyError:
        raise RemoteProtocolError(
            f"{event.value}: vring {index} is {state.name.lower().replace('_', ' and ')}"
        ) from None


# ---------------------------------------------------------------------- status

_S = DeviceStatus

#: Bits a driver may set (DEVICE_NEEDS_RESET is the device's; others are reserved).
DRIVER_STATUS_BITS = _S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK | _S.DRIVER_OK | _S.FAILED

#: bit -> the bits that must be set before it or with it (virtio 1.2, 3.1.1).
STATUS_PREREQUISITES: Mapping[DeviceStatus, DeviceStatus] = MappingProxyType(
    {
        _S.ACKNOWLEDGE: _S(0),
        _S.DRIVER: _S.ACKNOWLEDGE,
        _S.FEATURES_OK: _S.ACKNOWLEDGE | _S.DRIVER,
        _S.DRIVER_OK: _S.ACKNOWLEDGE | _S.DRIVER,
        _S.FAILED: _S(0),
    }
)


def next_status(current: DeviceStatus, value: int, *, features_set: bool) -> DeviceStatus:
    """The status after SET_STATUS ``value`` (0: reset); :class:`RemoteProtocolError` if illegal.

    ``features_set``: whether SET_FEATURES came since the last reset.
    """
    if value == 0:
        return _S(0)
    foreign = value & ~int(DRIVER_STATUS_BITS)
    if foreign:
        raise RemoteProtocolError(f"SET_STATUS: bits {foreign:#x} are not the driver's to set")
    status = _S(value)
    cleared = current & ~status
    if cleared:
        raise RemoteProtocolError(
            f"SET_STATUS: {status!r} clears {cleared!r} (only a reset to 0 does)"
        )
    for bit, needs in STATUS_PREREQUISITES.items():
        if status & bit and needs & ~status:
            raise RemoteProtocolError(f"SET_STATUS: {bit.name} without {(needs & ~status)!r}")
    if status & _S.FEATURES_OK and not features_set:
        raise RemoteProtocolError("SET_STATUS: FEATURES_OK before SET_FEATURES")
    return status
