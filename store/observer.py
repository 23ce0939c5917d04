"""What the spool reports as it works, for whoever watches it (the service's metrics).

Owns the `SpoolObserver` protocol: the writer reports each group commit (how many jobs, how long
BEGIN…COMMIT took, or that it failed), intake each accepted message, delivery each batch of
recorded outcomes. store/ imports no metrics library; the service plugs an implementation in with
`Spool.observe`. `committed` and `commit_failed` run on the writer's thread: implementations must
be thread-safe and quick, and what they raise is logged and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from store.records import Accepted, DeliveryJob, Outcome, Submission


class SpoolObserver(Protocol):
    def committed(self, jobs: int, seconds: float) -> None: ...

    def commit_failed(self, jobs: int) -> None: ...

    def accepted(self, submission: Submission, accepted: Accepted) -> None: ...

    def recorded(self, job: DeliveryJob, outcomes: Sequence[Outcome], now: float) -> None: ...


class NullObserver:
    """Watches nothing: the default until the service plugs in its metrics."""

    def committed(self, jobs: int, seconds: float) -> None:
        pass

    def commit_failed(self, jobs: int) -> None:
        pass

    def accepted(self, submission: Submission, accepted: Accepted) -> None:
        pass

    def recorded(self, job: DeliveryJob, outcomes: Sequence[Outcome], now: float) -> None:
        pass
