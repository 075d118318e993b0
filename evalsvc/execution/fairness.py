"""Fair claims: how many jobs of each run one claim may lease.

Round-robin, two levels: a claim's jobs are split evenly across the tenants that have claimable jobs,
then each tenant's share evenly across its runs. When the split does not come out even (a claim of 5
jobs over 3 tenants, or of 1 job over 2 runs), the extra jobs go to the tenants (runs) next in turn,
and the turn moves on with every claim, so over successive claims every tenant and every run gets its
turn whatever the size of its backlog. A tenant with one 100,000-item run and a tenant with a 1-item
run each get half of the next claim; the small run is not queued behind the large one.

A share a run cannot fill (it has fewer claimable jobs) is not handed to others within the same
claim: the claim loop claims again at once while there is room, and the next claim is split afresh.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence


def even_split(total: int, ways: int) -> list[int]:
    """`total` split into `ways` parts that differ by at most one, the larger first."""
    base, extra = divmod(total, ways)
    return [base + 1 if i < extra else base for i in range(ways)]


def _from_after(names: Sequence[str], last: str | None) -> list[str]:
    """Sorted `names` rotated to start after `last` (which may no longer be among them)."""
    start = 0 if last is None else bisect.bisect_right(names, last)
    return [*names[start:], *names[:start]]


class RoundRobin:
    """Splits a claim across tenants, then runs, taking turns from one claim to the next."""

    def __init__(self) -> None:
        self._last_tenant: str | None = None
        self._last_run: dict[str, str] = {}

    def shares(self, runs: Sequence[tuple[str, str]], limit: int) -> dict[str, int]:
        """Jobs to claim per run id, at most `limit` in all, from (tenant, run id) pairs that have
        claimable jobs."""
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for tenant, run_id in runs:
            by_tenant[tenant].append(run_id)
        if not by_tenant or limit <= 0:
            return {}
        tenants = _from_after(sorted(by_tenant), self._last_tenant)
        self._last_tenant = tenants[0]
        self._last_run = {t: r for t, r in self._last_run.items() if t in by_tenant}
        quota: dict[str, int] = {}
        for tenant, tenant_share in zip(tenants, even_split(limit, len(tenants)), strict=True):
            if tenant_share == 0:
                break
            tenant_runs = _from_after(sorted(by_tenant[tenant]), self._last_run.get(tenant))
            self._last_run[tenant] = tenant_runs[0]
            for run_id, run_share in zip(tenant_runs, even_split(tenant_share, len(tenant_runs)), strict=True):
                if run_share == 0:
                    break
                quota[run_id] = run_share
        return quota
