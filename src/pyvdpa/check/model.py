"""What a conformance check is made of: verdicts, what a back-end offered, results.

A case (:class:`pyvdpa.check.cases.Case`) is a row of a table: an id, a
title, the spec section it checks, a predicate on the :class:`Offer` (what
the back-end offered when the run began) that says why it does not apply,
and a run function.  The run function returns a detail line on success and
raises to say anything else: :class:`CaseFailedError` (the back-end broke
the rule), :class:`NotApplicableError` (found out while running, e.g. a net
back-end that returns no frames).  A case whose request pyvdpa's own codec
refuses to encode is skipped, with the reason."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyvdpa.drive.info import feature_list
from pyvdpa.errors import PyvdpaError
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId

__all__ = [
    "CaseFailedError",
    "CaseResult",
    "Group",
    "NotApplicableError",
    "Offer",
    "Verdict",
]


class Verdict(enum.Enum):
    """The result of one case."""

    PASS = "pass"
    FAIL = "fail"
    NOT_APPLICABLE = "n/a"
    SKIPPED = "skipped"


class Group(enum.Enum):
    """The part of the protocol a case checks (the order of the report)."""

    NEGOTIATION = "negotiation"
    MEMORY = "memory"
    RINGS = "ring lifecycle"
    DATA = "data path"
    RESET = "reset and reconnect"
    LOG = "dirty log"
    IOTLB = "IOTLB"
    CONFIG = "config space"
    HOSTILE = "hostile"


class CaseFailedError(PyvdpaError):
    """The back-end broke the rule the case checks."""


class NotApplicableError(PyvdpaError):
    """The case does not apply to this back-end (found while running)."""


@dataclass(frozen=True, slots=True)
class Offer:
    """What the back-end offered at the start of the run.

    ``loopback`` says whether a net back-end sends back the frames it is
    given (DPDK testpmd with io forwarding on a looped port, pyvdpa's
    loopback sim-net): the cases that need received frames apply only then.
    """

    device: DeviceId
    features: int
    protocol_features: ProtocolFeature
    protocol_offered: bool
    queues: int | None
    loopback: bool

    def lacks_feature(self, *features: int) -> str | None:
        """Why a case needing ``features`` does not apply (None: all offered)."""
        missing = [
            name
            for feature in features
            if not self.features & feature
            for name in feature_list(feature, self.device)
        ]
        return f"{', '.join(missing)} not offered" if missing else None

    def lacks_protocol(self, *features: ProtocolFeature) -> str | None:
        """Why a case needing protocol ``features`` does not apply."""
        if not self.protocol_offered:
            return "PROTOCOL_FEATURES not offered"
        missing = [f.name or hex(f) for f in features if not self.protocol_features & f]
        return f"protocol feature {', '.join(missing)} not offered" if missing else None


@dataclass(frozen=True, slots=True)
class CaseResult:
    """What one case found."""

    id: str
    group: str
    title: str
    section: str
    verdict: Verdict
    detail: str
    seconds: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "group": self.group,
            "title": self.title,
            "section": self.section,
            "verdict": self.verdict.value,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CaseResult:
        """Read back :meth:`as_dict`."""
        return cls(
            str(data["id"]),
            str(data["group"]),
            str(data["title"]),
            str(data["section"]),
            Verdict(data["verdict"]),
            str(data["detail"]),
            float(str(data["seconds"])),
        )
