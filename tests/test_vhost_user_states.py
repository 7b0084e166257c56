"""The back-end's state tables: every listed move, and a typed refusal for the rest.

The expected tables are written out here by hand, independently of how
:mod:`pyvdpa.vhost_user.states` builds them.
"""

from __future__ import annotations

import itertools

import pytest

from pyvdpa.errors import RemoteProtocolError
from pyvdpa.vhost_user.protocol import Request
from pyvdpa.vhost_user.states import (
    OWNERLESS_REQUESTS,
    PHASE_TRANSITIONS,
    RING_TRANSITIONS,
    Phase,
    RingEvent,
    RingState,
    next_phase,
    next_ring_state,
    next_status,
)
from pyvdpa.virtio.constants import DeviceStatus

SD, SE = RingState.STOPPED_DISABLED, RingState.STOPPED_ENABLED
TD, TE = RingState.STARTED_DISABLED, RingState.STARTED_ENABLED
E = RingEvent

#: (state, event) -> next state, as the spec's "Ring states" reads.
EXPECTED_RING = {
    (SD, E.KICK_FD): TD, (SE, E.KICK_FD): TE, (TD, E.KICK_FD): TD, (TE, E.KICK_FD): TE,
    (SD, E.KICK): TD, (SE, E.KICK): TE, (TD, E.KICK): TD, (TE, E.KICK): TE,
    (SD, E.GET_BASE): SD, (SE, E.GET_BASE): SE, (TD, E.GET_BASE): SD, (TE, E.GET_BASE): SE,
    (SD, E.ENABLE): SE, (SE, E.ENABLE): SE, (TD, E.ENABLE): TE, (TE, E.ENABLE): TE,
    (SD, E.DISABLE): SD, (SE, E.DISABLE): SD, (TD, E.DISABLE): TD, (TE, E.DISABLE): TD,
    (SD, E.RESET): SD, (SE, E.RESET): SD, (TD, E.RESET): SD, (TE, E.RESET): SD,
    (SD, E.SET_NUM): SD, (SE, E.SET_NUM): SE,
    (SD, E.SET_BASE): SD, (SE, E.SET_BASE): SE,
}  # fmt: skip

REFUSED_RING = sorted(
    set(itertools.product(RingState, RingEvent)) - set(EXPECTED_RING),
    key=lambda pair: (pair[0].name, pair[1].name),
)


def test_ring_table_is_exactly_the_expected_one() -> None:
    assert dict(RING_TRANSITIONS) == EXPECTED_RING


@pytest.mark.parametrize(
    ("state", "event"), sorted(EXPECTED_RING, key=lambda p: (p[0].name, p[1].name))
)
def test_every_listed_ring_transition(state: RingState, event: RingEvent) -> None:
    assert next_ring_state(3, state, event) is EXPECTED_RING[(state, event)]


@pytest.mark.parametrize(("state", "event"), REFUSED_RING)
def test_ring_transitions_not_listed_are_refused(state: RingState, event: RingEvent) -> None:
    with pytest.raises(RemoteProtocolError, match=f"{event.value}: vring 3 is started") as info:
        next_ring_state(3, state, event)
    assert not info.value.drop_connection


def test_refused_ring_moves_are_size_and_base_of_started_rings() -> None:
    assert {(s, e) for s, e in REFUSED_RING} == {
        (s, e) for s in (TD, TE) for e in (E.SET_NUM, E.SET_BASE)
    }


# ---------------------------------------------------------------------- phase

#: QEMU 7.2's vhost_user_backend_init, then the requests that only read or reset.
BEFORE_OWNER = {
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


def test_ownerless_requests() -> None:
    assert set(OWNERLESS_REQUESTS) == BEFORE_OWNER


@pytest.mark.parametrize("request_", sorted(BEFORE_OWNER), ids=lambda r: r.name)
def test_listed_before_owner(request_: Request) -> None:
    expected = Phase.OWNED if request_ is Request.SET_OWNER else Phase.AWAITING_OWNER
    assert next_phase(Phase.AWAITING_OWNER, request_) is expected


@pytest.mark.parametrize("request_", sorted(set(Request) - BEFORE_OWNER), ids=lambda r: r.name)
def test_refused_before_owner(request_: Request) -> None:
    with pytest.raises(RemoteProtocolError, match=f"{request_.name} before SET_OWNER"):
        next_phase(Phase.AWAITING_OWNER, request_)


@pytest.mark.parametrize("request_", sorted(Request), ids=lambda r: r.name)
def test_owned_accepts_everything_and_stays_owned(request_: Request) -> None:
    # SET_OWNER again (QEMU: once per queue pair) and RESET_OWNER keep the session.
    assert next_phase(Phase.OWNED, request_) is Phase.OWNED


def test_phase_table_size() -> None:
    assert len(PHASE_TRANSITIONS) == len(BEFORE_OWNER) + len(Request)


# ---------------------------------------------------------------------- status

S = DeviceStatus
ACK, DRV, FOK, DOK, FAIL = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK, S.FAILED

LEGAL_STATUS = [
    # The driver's initialisation, one step at a time (virtio 1.2, 3.1.1).
    (S(0), ACK, True),
    (ACK, ACK | DRV, True),
    (ACK | DRV, ACK | DRV | FOK, True),
    (ACK | DRV | FOK, ACK | DRV | FOK | DOK, True),
    # Several steps at once.
    (S(0), ACK | DRV | FOK | DOK, True),
    # QEMU 7.2's vhost_user_dev_start: GET_STATUS, then ACK | DRIVER | DRIVER_OK added.
    (S(0), ACK | DRV | DOK, False),
    (ACK | DRV, ACK | DRV | DOK, False),
    # The same status again.
    (ACK | DRV, ACK | DRV, False),
    # FAILED at any point.
    (S(0), FAIL, False),
    (ACK | DRV | FOK | DOK, ACK | DRV | FOK | DOK | FAIL, True),
    # 0 resets from anywhere.
    (ACK | DRV | FOK | DOK, S(0), True),
    (FAIL, S(0), False),
]


@pytest.mark.parametrize(("current", "value", "features_set"), LEGAL_STATUS)
def test_listed_status_moves(current: S, value: S, features_set: bool) -> None:
    assert next_status(current, int(value), features_set=features_set) == value


REFUSED_STATUS = [
    (S(0), int(ACK | DRV | FOK), False, "FEATURES_OK before SET_FEATURES"),
    (ACK | DRV, int(ACK | DRV | FOK), False, "FEATURES_OK before SET_FEATURES"),
    (ACK | DRV | FOK, int(ACK | DRV), True, "clears"),
    (ACK, int(DRV), True, "clears"),
    (S(0), int(DRV), True, "DRIVER without"),
    (S(0), int(ACK | FOK), True, "FEATURES_OK without"),
    (S(0), int(ACK | DOK), True, "DRIVER_OK without"),
    (S(0), int(S.DEVICE_NEEDS_RESET), True, "not the driver's"),
    (S(0), 0x10, True, "not the driver's"),
    (S(0), 0x20 | int(ACK), True, "not the driver's"),
]


@pytest.mark.parametrize(("current", "value", "features_set", "match"), REFUSED_STATUS)
def test_status_moves_not_listed_are_refused(
    current: S, value: int, features_set: bool, match: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        next_status(current, value, features_set=features_set)
    assert not info.value.drop_connection
