"""``pyvdpa check``: conformance and robustness of any vhost-user back-end.

A table of cases (:data:`~pyvdpa.check.cases.CASES`), each naming the spec
section it checks, runs against the back-end on fresh connections
(:func:`~pyvdpa.check.runner.run_check`); :mod:`pyvdpa.check.report`
prints the verdicts and renders several back-ends' results side by side.
"""

from pyvdpa.check.cases import CASES, Case
from pyvdpa.check.model import CaseResult, Group, Offer, Verdict
from pyvdpa.check.runner import CheckReport, run_check

__all__ = ["CASES", "Case", "CaseResult", "CheckReport", "Group", "Offer", "Verdict", "run_check"]
