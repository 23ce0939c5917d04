"""Stats: per-status counts, bounce and deferral rates and delivery latency, over a window.

Owns the two reads behind `GET /v1/stats` and `postroom stats` (one aggregate per query, the
percentiles computed inside SQLite) and turns their rows into `StatsGroup` records.
"""

from __future__ import annotations

import aiosqlite

from store.records import RecipientStatus, StatsGroup, StatsGrouping
from store.sql import Q


async def stats(
    conn: aiosqlite.Connection, since: float, until: float, group_by: StatsGrouping | None
) -> list[StatsGroup]:
    """Groups in order (one, named None, when not grouped: even with no messages)."""
    suffix = group_by.value if group_by else "total"
    params = {"since": since, "until": until}
    counts: dict[str, dict[RecipientStatus, int]] = {}
    attempted: dict[str, int] = {}
    deferred: dict[str, int] = {}
    await conn.execute("BEGIN")  # both reads see one snapshot
    try:
        async with conn.execute(Q[f"stats_counts_{suffix}"], params) as cur:
            for row in await cur.fetchall():
                group = str(row["grp"])
                by_status = counts.setdefault(group, dict.fromkeys(RecipientStatus, 0))
                by_status[RecipientStatus(row["status"])] = row["units"]
                attempted[group] = attempted.get(group, 0) + row["attempted"]
                deferred[group] = deferred.get(group, 0) + row["deferred"]
        async with conn.execute(Q[f"stats_latency_{suffix}"], params) as cur:
            latency = {str(row["grp"]): (row["p50"], row["p95"]) for row in await cur.fetchall()}
    finally:
        await conn.execute("COMMIT")
    if group_by is None and not counts:
        counts[""] = dict.fromkeys(RecipientStatus, 0)
    return [
        StatsGroup(
            group=group if group_by else None,
            counts=by_status,
            attempted=attempted.get(group, 0),
            deferred=deferred.get(group, 0),
            latency_p50=latency.get(group, (None, None))[0],
            latency_p95=latency.get(group, (None, None))[1],
        )
        for group, by_status in sorted(counts.items())
    ]
