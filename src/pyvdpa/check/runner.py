"""Run the case table against a back-end; collect one verdict per case.

Theory of operation: the runner first asks what the back-end offers
(:meth:`~pyvdpa.check.target.Target.discover`), then runs each case of
:data:`~pyvdpa.check.cases.CASES` on fresh connections.  A case that does
not apply to the offer is ``n/a`` with the reason; one the front-end cannot
send (pyvdpa's codec refuses to encode it) is ``skipped``.  After every hostile
case and every failed case the runner probes the back-end (a fresh
connection negotiates and moves one buffer): a hostile case after which
the back-end no longer serves fails with that reason, and once the
back-end is gone every remaining case fails with "back-end gone after
case X" instead of waiting for timeouts one by one.  Errors of any kind
inside a case become its failure detail, never a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pyvdpa.check.cases import CASES, Case
from pyvdpa.check.model import (
    CaseFailedError,
    CaseResult,
    NotApplicableError,
    Offer,
    Verdict,
)
from pyvdpa.check.target import Target, timed_out
from pyvdpa.drive.info import feature_list
from pyvdpa.errors import LocalProtocolError
from pyvdpa.virtio.constants import DeviceId

__all__ = ["CheckReport", "run_check"]

Progress = Callable[[int, int, CaseResult], None]


@dataclass
class CheckReport:
    """Every case's result against one back-end (``--json`` prints :meth:`as_dict`)."""

    path: str
    device: str
    features: list[str]
    protocol_features: list[str]
    results: list[CaseResult] = field(default_factory=list)
    #: The case after which the back-end stopped serving, if it did.
    gone_after: str | None = None

    def counts(self) -> dict[str, int]:
        """Cases per verdict."""
        return {v.value: sum(r.verdict is v for r in self.results) for v in Verdict}

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "device": self.device,
            "features": self.features,
            "protocol_features": self.protocol_features,
            "gone_after": self.gone_after,
            "counts": self.counts(),
            "results": [r.as_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CheckReport:
        """Read back :meth:`as_dict`."""
        results = data["results"]
        assert isinstance(results, list)
        features, protocol = data["features"], data["protocol_features"]
        assert isinstance(features, list) and isinstance(protocol, list)
        gone = data.get("gone_after")
        return cls(
            str(data["path"]),
            str(data["device"]),
            [str(f) for f in features],
            [str(f) for f in protocol],
            [CaseResult.from_dict(r) for r in results],
            None if gone is None else str(gone),
        )


def _result(case: Case, verdict: Verdict, detail: str, started: float) -> CaseResult:
    return CaseResult(
        case.id,
        case.group.value,
        case.title,
        case.section,
        verdict,
        detail,
        time.monotonic() - started,
    )


def _describe(exc: BaseException, timeout: float) -> str:
    if timed_out(exc):
        return f"no answer within {timeout:g} s"
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _run_one(target: Target, case: Case) -> tuple[Verdict, str]:
    try:
        return Verdict.PASS, case.run(target)
    except CaseFailedError as exc:
        return Verdict.FAIL, _describe(exc, target.timeout)
    except NotApplicableError as exc:
        return Verdict.NOT_APPLICABLE, _describe(exc, target.timeout)
    except LocalProtocolError as exc:
        # pyvdpa's own codec would not send what the case needs.
        return Verdict.SKIPPED, f"not sent: {_describe(exc, target.timeout)}"
    except Exception as exc:
        return Verdict.FAIL, _describe(exc, target.timeout)


def _still_serving(target: Target) -> str | None:
    """Why the back-end is not serving, or None when a fresh connection moves a buffer."""
    try:
        target.probe()
    except Exception as exc:
        return _describe(exc, target.timeout)
    return None


def run_check(
    path: str,
    device: DeviceId | None = None,
    *,
    timeout: float = 5.0,
    cases: Sequence[Case] = CASES,
    progress: Progress | None = None,
) -> CheckReport:
    """Run ``cases`` against the back-end at ``path``; return the report.

    Raises :class:`~pyvdpa.errors.PyvdpaError` only when the back-end cannot
    be reached or its device type not told at all.
    """
    target = Target(path, device, timeout=timeout)
    offer: Offer = target.discover()
    report = CheckReport(
        path,
        "net" if offer.device == DeviceId.NET else "blk",
        feature_list(offer.features, offer.device),
        [f.name or hex(f) for f in type(offer.protocol_features) if offer.protocol_features & f],
    )
    for number, case in enumerate(cases, 1):
        started = time.monotonic()
        reason = case.applies(offer)
        if reason is not None:
            verdict, detail = Verdict.NOT_APPLICABLE, reason
        elif report.gone_after is not None:
            verdict, detail = Verdict.FAIL, f"back-end gone after case {report.gone_after}"
        else:
            verdict, detail = _run_one(target, case)
            if case.hostile or verdict is Verdict.FAIL:
                dead = _still_serving(target)
                if dead is not None:
                    report.gone_after = case.id
                    if verdict is Verdict.FAIL:
                        detail = f"{detail}; back-end no longer serving: {dead}"
                    else:
                        verdict, detail = Verdict.FAIL, f"back-end no longer serving: {dead}"
        result = _result(case, verdict, detail, started)
        report.results.append(result)
        if progress is not None:
            progress(number, len(cases), result)
    return report
