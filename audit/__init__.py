"""Empirical privacy audit: canary experiments on the DP mechanisms and epsilon lower bounds.

:mod:`audit.bounds` holds the statistics (Clopper-Pearson, held-out threshold test);
:mod:`audit.canary` runs the project's own mechanisms with and without a worst-case canary.
"""
from audit.bounds import AuditBound, ThresholdTest, audit_bound, clopper_pearson, max_certifiable_epsilon

__all__ = ["AuditBound", "ThresholdTest", "audit_bound", "clopper_pearson", "max_certifiable_epsilon"]
