"""``pyvdpa check``'s table, its one-line errors and the side-by-side page.

The cases themselves run against real back-ends in test_check_peers.py and
against deliberately broken ones in test_check_broken.py; here: the table
is well formed, applicability follows what a back-end offers, an
unreachable socket is one line on standard error, and ``--report`` renders
saved ``--json`` results side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pyvdpa.check.cases import CASES
from pyvdpa.check.model import CaseResult, Group, Offer, Verdict
from pyvdpa.check.runner import CheckReport
from pyvdpa.vhost_user.protocol import ProtocolFeature
from pyvdpa.virtio.constants import DeviceId, NetFeature, VirtioFeature


def _pyvdpa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvdpa", *args], capture_output=True, text=True, timeout=60
    )


def test_every_case_has_an_id_a_section_and_a_group() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    for case in CASES:
        assert case.section.startswith(("vhost-user: ", "virtio 1.2 ")), case.id
        assert case.title and case.run.__doc__, case.id
    assert {case.group for case in CASES} == set(Group)
    assert all(case.hostile for case in CASES if case.group is Group.HOSTILE)


def test_applicability_follows_the_offer() -> None:
    blk = Offer(
        DeviceId.BLOCK,
        int(VirtioFeature.VERSION_1 | VirtioFeature.PROTOCOL_FEATURES),
        ProtocolFeature.REPLY_ACK,
        protocol_offered=True,
        queues=None,
        loopback=False,
    )
    reasons = {case.id: case.applies(blk) for case in CASES}

    assert reasons["data.packed"] == "RING_PACKED not offered"
    assert reasons["data.mrg-rxbuf"] == "net devices only"
    assert reasons["config.read"] == "protocol feature CONFIG not offered"
    assert reasons["iotlb.miss"] == "ACCESS_PLATFORM not offered"
    assert reasons["neg.reply-ack"] is None and reasons["data.split"] is None

    legacy = Offer(DeviceId.NET, int(NetFeature.MRG_RXBUF), ProtocolFeature(0), False, None, True)
    reasons = {case.id: case.applies(legacy) for case in CASES}
    assert reasons["neg.protocol"] == "PROTOCOL_FEATURES not offered"
    assert reasons["data.mrg-rxbuf"] is None


def test_unreachable_socket_is_one_line(tmp_path: Path) -> None:
    proc = _pyvdpa("check", "--socket", str(tmp_path / "none.sock"), "--timeout", "0.5")

    assert proc.returncode == 1
    assert (
        proc.stderr == f"pyvdpa: error: cannot connect to {tmp_path / 'none.sock'}: no listener\n"
    )


def test_report_without_files_is_a_usage_error() -> None:
    proc = _pyvdpa("check", "--report")

    assert proc.returncode == 2 and proc.stderr.startswith("pyvdpa: error: ")
    assert len(proc.stderr.splitlines()) == 1


def test_a_file_that_is_no_report_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")

    proc = _pyvdpa("check", "--report", str(bad))

    assert proc.returncode == 2
    assert proc.stderr.startswith(f"pyvdpa: error: {bad}: not a pyvdpa check --json report")


def _report(path: str, verdicts: dict[str, Verdict]) -> CheckReport:
    report = CheckReport(path, "net", ["VERSION_1"], ["REPLY_ACK"], gone_after=None)
    for case in CASES:
        verdict = verdicts.get(case.id, Verdict.PASS)
        report.results.append(
            CaseResult(case.id, case.group.value, case.title, case.section, verdict, "why", 0.1)
        )
    return report


def test_report_renders_back_ends_side_by_side(tmp_path: Path) -> None:
    one = _report("/a", {"ring.base": Verdict.FAIL})
    two = _report("/b", {"data.packed": Verdict.NOT_APPLICABLE})
    (tmp_path / "alpha.json").write_text(json.dumps(one.as_dict()))
    (tmp_path / "beta.json").write_text(json.dumps(two.as_dict()))
    page = tmp_path / "page.md"

    proc = _pyvdpa(
        "check",
        "--report",
        str(tmp_path / "alpha.json"),
        str(tmp_path / "beta.json"),
        "--generated-by",
        "scripts/conformance.sh",
        "--output",
        str(page),
    )

    assert proc.returncode == 0, proc.stderr
    text = page.read_text()
    assert "```sh\nscripts/conformance.sh\n```" in text
    assert "| case | checks | section | alpha | beta |" in text
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if "| `" in line}
    assert set(rows) == {case.id for case in CASES}
    assert rows["ring.base"].endswith("| **FAIL** | pass |")
    assert rows["data.packed"].endswith("| pass | n/a |")
    assert f"* **alpha** (net): {len(CASES) - 1} pass, 1 fail, 0 n/a, 0 skipped" in text
    assert CheckReport.from_dict(json.loads(json.dumps(one.as_dict()))) == one
