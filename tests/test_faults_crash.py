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
