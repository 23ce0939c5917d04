"""Worker processes (`smtp.workers`), from the side of the service process that owns them.

With `smtp.workers = N`, the service opens the SMTP listening sockets (and, with
`api.in_workers`, the API's) itself but accepts on none of them: it starts N worker processes
(relay/worker.py) that inherit the sockets and run the SMTP sessions and the API, so that the
protocol work of many clients is spread over the machine's cores while one process keeps the
spool's writer, the delivery engine and the webhooks. The service hands the workers CPU work
too (`offload`): DKIM signing for the engine, and the validation and composition of API
messages when it serves the API itself, so its loop is left the rest.

Owns starting the workers (each gets its end of a socketpair, the sockets and the settings, and
says when it listens), answering them (every SMTP call goes to the service's one `LocalDoor`, so
that session counts, AUTH lock-outs and idempotency are the server's, and `commit` answers DATA
only after the spool committed; every API call to `answer_api`, the service's own app state,
api/remote.py), supervision (a worker that dies, or hangs past
`smtp.worker_watchdog` and is killed, is started again and what it had counted is released; one
that keeps dying stops the service), reloads (the new settings are sent to each) and the drain
at shutdown: each worker finishes its transactions and requests, which the service still
commits, before the service goes on to close the spool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from config import Settings
from relay.dkim import sign_here, sign_message
from relay.frontdoor import LocalDoor
from relay.ipc import Channel, ChannelClosed, StartSettings
from relay.metrics import Metrics
from store import DomainKeys

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A worker that must be started again this many times within `_RESTART_WINDOW` seconds stops the
#: service instead: something is wrong that another start will not fix.
_MAX_RESTARTS = 5
_RESTART_WINDOW = 60.0
_START_TIMEOUT = 30.0


class WorkerFailed(RuntimeError):
    """A worker could not start, or keeps dying."""


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    #: Sessions admitted through this worker and not yet released, per client: what the door
    #: must forget if the worker dies without releasing them.
    open: collections.Counter[str] = field(default_factory=collections.Counter)
    served: asyncio.Task[None] | None = None
    #: Work handed to this worker (`offload`) and not answered yet
    busy: int = 0
    has_ended: bool = False


class Workers:
    def __init__(self, settings: Settings, door: LocalDoor, metrics: Metrics) -> None:
        self.settings = settings
        #: The settings the service started with, which the API keeps until a restart: every
        #: worker holds them, so an API send need not carry them (`StartSettings`).
        self._started_with = settings
        self._door = door
        self._metrics = metrics
        self._listeners: list[tuple[int, bool]] = []
        self._api_listeners: list[int] = []
        #: Answers the API ops of workers that serve `api.listen` (api/remote.py `Answers`).
        self.answer_api: Callable[[str, tuple[Any, ...]], Any] | None = None
        self._tls: tuple[Path, Path] | None = None
        self._workers: dict[int, _Worker] = {}
        self._restarts: collections.deque[float] = collections.deque()
        self._is_stopping = False

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values()]

    async def start(
        self, listeners: list[tuple[int, bool]], tls: tuple[Path, Path] | None,
        api_listeners: list[int] | None = None,
    ) -> None:
        """Start every worker and wait until each listens; `WorkerFailed` if one cannot.

        `listeners` are the SMTP listening sockets' descriptors, each with whether it is
        implicit TLS; `tls` the certificate and key the service loaded, if it did;
        `api_listeners` the API's sockets, when the workers serve it (`answer_api` answers them).
        """
        self._listeners = listeners
        self._api_listeners = list(api_listeners or [])
        assert not self._api_listeners or self.answer_api is not None
        self._tls = tls
        await asyncio.gather(
            *(self._start(index) for index in range(1, self.settings.smtp.worker_count + 1))
        )

    async def _start(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno(), *(fd for fd, _ in self._listeners), *self._api_listeners]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.worker", str(theirs.fileno()),
                self.settings.server.event_loop,
                pass_fds=fds, stdin=asyncio.subprocess.DEVNULL, env=_worker_environment(),
            )
        finally:
            theirs.close()
        channel = await Channel.over(ours)
        worker = self._workers[index] = _Worker(index, process, channel)
        worker.served = asyncio.create_task(
            channel.serve(lambda op, args: self._handle(worker, op, args)),
            name=f"smtp-worker-{index}",
        )
        channel.notify(
            "start", self.settings, self._listeners, self._api_listeners, self._tls, index,
            self._started_with,
        )
        ready = asyncio.create_task(worker.ready.wait())
        exited = asyncio.create_task(process.wait())
        await asyncio.wait(
            [ready, exited], timeout=_START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        exited.cancel()
        if not worker.ready.is_set():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise WorkerFailed(
                f"smtp worker {index} did not start (exit status {process.returncode})"
            )
        logger.debug("smtp worker %d listening (pid %d)", index, process.pid)
        return worker

    # -- answering a worker --------------------------------------------------------------------

    def _handle(self, worker: _Worker, op: str, args: tuple[Any, ...]) -> Any:
        door = self._door
        if op == "commit":
            return door.commit(*args)
        if op.startswith("api."):
            assert self.answer_api is not None
            return self.answer_api(op, args)
        if op == "admit":
            admission = door.admit(*args)
            if admission.refusal is None:
                worker.open[admission.client] += 1
                self._metrics.smtp_session_opened()
            return admission
        if op == "release":
            (client,) = args
            if worker.open[client] > 0:
                worker.open[client] -= 1
                if not worker.open[client]:
                    del worker.open[client]
                door.release(client)
                self._metrics.smtp_session_closed()
            return None
        if op == "authenticate":
            return door.authenticate(*args)
        if op == "is_locked":
            return door.is_locked(*args)
        if op == "auth_succeeded":
            return door.auth_succeeded(*args)
        if op == "auth_failed":
            return door.auth_failed(*args)
        if op == "metric":
            (name,) = args
            if name == "smtp_sessions":
                self._metrics.smtp_sessions.inc()
            elif name == "smtp_auth_failures":
                self._metrics.smtp_auth_failures.inc()
            return None
        if op == "ready":
            worker.ready.set()
            self._metrics.smtp_workers.inc()
            return None
        if op == "drained":
            worker.drained.set()
            if not self._is_stopping:
                # It drained on a signal of its own (someone's `kill`): let it end now, and
                # `run` starts another. At a shutdown, `stop` lets every worker go at once.
                worker.channel.notify("exit")
            return None
        raise ValueError(f"unknown call {op!r}")

    def _forget(self, worker: _Worker) -> None:
        """Release what a gone worker had counted: its sessions ended with it."""
        for client, count in worker.open.items():
            for _ in range(count):
                self._door.release(client)
                self._metrics.smtp_session_closed()
        worker.open.clear()

    # -- supervision ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start again a worker that died; raise `WorkerFailed` if they keep dying.

        A worker whose loop stops answering for `smtp.worker_watchdog` is killed, and so
        started again like one that died: its sessions were stuck with it.
        """
        watchdog = asyncio.create_task(self._watch(), name="smtp-worker-watchdog")
        try:
            await self._supervise()
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    async def _watch(self) -> None:
        limit = self.settings.smtp.worker_watchdog
        while True:
            await asyncio.sleep(limit / 3)
            for worker in list(self._workers.values()):
                if not worker.ready.is_set() or worker.channel.is_closed or self._is_stopping:
                    continue
                try:
                    await asyncio.wait_for(worker.channel.call("ping"), limit)
                except TimeoutError:
                    logger.error("smtp worker %d (pid %d) did not answer for %gs: killed",
                                 worker.index, worker.process.pid, limit)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
                except ChannelClosed:
                    pass  # it ended: `_supervise` sees to it

    async def _supervise(self) -> None:
        while True:
            waits = {
                asyncio.create_task(w.process.wait()): w for w in self._workers.values()
            }
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
            for task in done:
                worker = waits[task]
                await self._ended(worker)
                if self._is_stopping:
                    return
                now = time.monotonic()
                self._restarts.append(now)
                while self._restarts and self._restarts[0] < now - _RESTART_WINDOW:
                    self._restarts.popleft()
                if len(self._restarts) > _MAX_RESTARTS:
                    raise WorkerFailed(
                        f"smtp worker {worker.index} keeps dying (exit status "
                        f"{worker.process.returncode}); {len(self._restarts)} restarts within "
                        f"{_RESTART_WINDOW:g}s"
                    )
                self._metrics.smtp_worker_restarts.inc()
                if worker.process.returncode == 0:
                    logger.warning("smtp worker %d (pid %d) stopped on a signal: starting "
                                   "another", worker.index, worker.process.pid)
                else:
                    logger.error("smtp worker %d (pid %d) died with exit status %s: starting "
                                 "it again", worker.index, worker.process.pid,
                                 worker.process.returncode)
                await self._start(worker.index)

    async def _ended(self, worker: _Worker) -> None:
        if worker.ready.is_set() and not worker.has_ended:
            self._metrics.smtp_workers.dec()
        worker.has_ended = True
        worker.channel.close()
        if worker.served is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.served
        self._forget(worker)

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.ready.is_set() and not w.channel.is_closed]

    @property
    def width(self) -> int:
        """Workers that can take work now."""
        return len(self._live())

    async def offload(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the worker with the least work in hand, or in a thread here if
        none is running or the one chosen dies meanwhile. `function` must be a module-level
        function of ours (it travels by reference); what it raises is raised here."""
        live = self._live()
        if not live:
            return await asyncio.to_thread(function, *args)
        worker = min(live, key=lambda w: w.busy)
        worker.busy += 1
        sent = tuple(StartSettings() if arg is self._started_with else arg for arg in args)
        try:
            result: T = await worker.channel.call("call", function, sent)
        except ChannelClosed:
            return await asyncio.to_thread(function, *args)
        finally:
            worker.busy -= 1
        return result

    async def sign(self, keys: DomainKeys, content: bytes) -> bytes:
        """DKIM-sign `content` in a worker; in this process if none is running."""
        if not self.width:
            return await sign_here(keys, content)
        return await self.offload(sign_message, keys, content)

    def reconfigure(self, settings: Settings, tls: tuple[Path, Path] | None) -> None:
        """After a reload: each worker takes the log settings and the certificate anew."""
        self.settings = settings
        self._tls = tls if self._tls is not None else None
        for worker in self._workers.values():
            worker.channel.notify("settings", settings, self._tls)

    async def stop(
        self, timeout: float, let_go: Callable[[], None] = lambda: None  # noqa: ASYNC109
    ) -> None:
        """The drain: each worker finishes its transactions within `timeout`, then exits.

        Until every worker has finished, each keeps answering new connections with 421. Then
        `let_go` closes the service's own copies of the listening sockets, and the workers close
        theirs: the sockets close with the last worker's, as it stops accepting, so no client
        is left waiting in their backlog for a reset.
        """
        self._is_stopping = True
        workers = list(self._workers.values())
        for worker in workers:
            worker.channel.notify("drain")
        for worker in workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_either(worker.drained, worker.process), timeout + 5.0)
        let_go()
        for worker in workers:
            worker.channel.notify("exit")
        for worker in workers:
            try:
                await asyncio.wait_for(worker.process.wait(), 5.0)
            except TimeoutError:
                logger.error("smtp worker %d did not stop in time: killed", worker.index)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
            await self._ended(worker)


def _worker_environment() -> dict[str, str]:
    """The service's environment without systemd's notification and watchdog variables: the
    service alone speaks to systemd (the unit's NotifyAccess=main would ignore a worker)."""
    return {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ONLY}


_SYSTEMD_ONLY = frozenset({"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC"})


async def _either(event: asyncio.Event, process: asyncio.subprocess.Process) -> None:
    """Until `event` is set or `process` has exited."""
    waits = [asyncio.create_task(event.wait()), asyncio.create_task(process.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
