"""Telling systemd how the service is doing: sd_notify(3) over `$NOTIFY_SOCKET`, stdlib only.

Owns the notification protocol (newline-separated `KEY=value` lines in one datagram to the unix
socket systemd names, `@` meaning the abstract namespace) and the watchdog: with
`$WATCHDOG_USEC` set (`WatchdogSec=` in the unit), `WATCHDOG=1` every half period from a task on
the event loop, so a loop that stops turning stops the pings and systemd restarts the service.
Without `$NOTIFY_SOCKET` every call does nothing; a failed send is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager; create with `from_environment()`."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._socket: socket.socket | None = None
        self._has_failed = False
        #: Seconds between WATCHDOG=1 pings (half of systemd's period), or None: no watchdog.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        usec: int | None = None
        watchdog_pid = env.get("WATCHDOG_PID")
        if watchdog_pid is None or watchdog_pid == str(os.getpid()):  # sd_watchdog_enabled(3)
            try:
                usec = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                usec = None
        return cls(address, usec)

    @property
    def is_enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send `fields` (e.g. "READY=1", "STATUS=…") as one datagram."""
        if self._address is None:
            return
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)  # a full receive queue drops a ping, never blocks
                self._socket = sock
            self._socket.sendto("\n".join(fields).encode(), address)
        except OSError as exc:
            if not self._has_failed:
                logger.warning("cannot notify the service manager at %s: %s", self._address, exc)
                self._has_failed = True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (≥ 253) tell this reload from an earlier one.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    async def run_watchdog(self) -> None:
        """Ping forever (until cancelled); returns at once when there is no watchdog."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
