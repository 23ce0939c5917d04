"""Crash: SIGKILL under mixed SMTP + HTTP load, restart, drain — nothing acknowledged is lost.

The drill itself lives in tests/support/crash.py; `bench/crash.py` runs it at full size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.crash import CrashPlan, run_crash

pytestmark = pytest.mark.slow


async def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path):
    report = await run_crash(tmp_path, CrashPlan(kills=3, messages=300, seed=11))
    assert report.problems() == [], report.summary()
    assert report.kills == 3
    assert len(report.acked) > 0 and report.arrivals
    # Every message was sent exactly once; those in flight at a kill may have got no answer.
    assert len(report.sent) == 300 and set(report.sent.values()) == {1}


async def test_sigkill_of_the_service_with_smtp_workers_loses_nothing_acknowledged(
    tmp_path: Path,
):
    # The kill hits the service process alone: its workers must stop by themselves, and a
    # message a worker was answering must get a 2xx only if the service had committed it.
    report = await run_crash(tmp_path, CrashPlan(kills=2, messages=200, seed=5, smtp_workers=2))
    assert report.problems() == [], report.summary()
    assert report.kills == 2 and report.orphans == []
    assert len(report.acked) > 0
    assert len(report.sent) == 200 and set(report.sent.values()) == {1}
