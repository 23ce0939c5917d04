"""Fixtures: real parts on 127.0.0.1, port 0 — DNS, MX sinks, Postroom in-process and as a process.

Compose them: `dns` serves `example.test` → `mx.example.test` → 127.0.0.1; `mx_sink` is that MX;
`make_settings` points Postroom at both; `postroom` runs the whole service in the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import uvloop

from config import Settings
from relay.service import Service
from store import Scope, Spool
from tests.support import DnsServer, MxSink, wait_until

DOMAIN = "example.test"
MX_HOST = "mx.example.test"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The in-process Postroom, and everything a test runs beside it, on uvloop: the loop
    `postroom serve` runs on by default (`server.event_loop`, relay/eventloop.py). The asyncio
    loop is run by the tests of the setting itself (test_eventloop.py) and by the fuzzing
    tests' own loop (test_faults_fuzz.py)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for Postroom's listeners, signed by the test CA."""
    cert = ca.issue_cert("postroom.test", "localhost", "127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(cert_path, append=True)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    """What an SMTP client uses to trust Postroom's certificate."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer() as server:
        server.add_mx(DOMAIN, MX_HOST)
        server.add_a(MX_HOST, "127.0.0.1")
        yield server


@pytest.fixture
async def mx_sink() -> AsyncIterator[MxSink]:
    async with MxSink(hostname=MX_HOST) as sink:
        yield sink


def settings_data(tmp_path: Path, dns: DnsServer, mx_port: int, server_cert: tuple[Path, Path]
                  ) -> dict[str, Any]:
    cert, key = server_cert
    return {
        "server": {"data_dir": str(tmp_path / "data"), "hostname": "postroom.test",
                   "shutdown_timeout": "5s"},
        # AUTH failures are answered without the production delay: tests stay fast.
        # The sessions in the service process unless a test asks for workers (`smtp_workers`).
        "smtp": {"listen": ["127.0.0.1:0"], "tls_cert": str(cert), "tls_key": str(key),
                 "auth_failure_delay": "1ms", "workers": 0},
        "api": {"listen": "127.0.0.1:0"},
        "delivery": {
            "dns_nameservers": [f"127.0.0.1:{dns.port}"],
            "mx_port": mx_port,
            "retry_schedule": ["1s", "1s"],
            "poll_interval": "0.1s",
            "connect_timeout": "5s",
        },
        # Most tests send from domains they never add; tests of the policy turn this off.
        "policy": {"allow_unconfigured_domains": True},
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


@pytest.fixture
def smtp_workers(request: pytest.FixtureRequest) -> int:
    """`smtp.workers` for the Postroom a test starts: 0 unless a module parametrizes it.

    `pytestmark = WITH_AND_WITHOUT_WORKERS` runs a module's tests both ways: the sessions in the
    service process, and in two worker processes behind it.
    """
    return int(getattr(request, "param", 0))


WITH_AND_WITHOUT_WORKERS = pytest.mark.parametrize(
    "smtp_workers", [0, 2], ids=["in-process", "workers"], indirect=True
)


@pytest.fixture
def make_settings(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert: tuple[Path, Path],
    smtp_workers: int,
) -> Callable[..., Settings]:
    def make(**sections: dict[str, Any]) -> Settings:
        data = settings_data(tmp_path, dns, mx_sink.port, server_cert)
        data["smtp"]["workers"] = smtp_workers
        return Settings(**merge(data, sections))

    return make


@dataclass
class Running:
    """A Postroom service running in the test's loop."""

    service: Service
    task: asyncio.Task[None]

    @property
    def spool(self) -> Spool:
        assert self.service.spool is not None
        return self.service.spool

    @property
    def smtp_port(self) -> int:
        return self.service.smtp_addresses[0][1]

    @property
    def smtps_port(self) -> int:
        """The first implicit-TLS listener (start with smtp={"tls_listen": ["127.0.0.1:0"]})."""
        return self.service.smtps_addresses[0][1]

    @property
    def api_url(self) -> str:
        assert self.service.api_address is not None
        host, port = self.service.api_address
        return f"http://{host}:{port}"

    async def new_key(self, scope: Scope = Scope.FULL) -> str:
        return (await self.spool.create_key("test", scope)).secret

    def http(self, key: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=self.api_url, headers=headers, timeout=10)

    async def stop(self) -> None:
        self.service.stop()
        await asyncio.wait_for(self.task, 30)


async def start_postroom(settings: Settings) -> Running:
    service = Service(settings)
    task = asyncio.create_task(service.run(handle_signals=False))
    await wait_until(
        lambda: service.readiness.is_ready or task.done(), message="postroom did not start"
    )
    if task.done():
        task.result()
    return Running(service, task)


@pytest.fixture
async def start(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """`await start(smtp={...})` runs Postroom with those settings; stopped at teardown."""
    running: list[Running] = []

    async def launch(**sections: dict[str, Any]) -> Running:
        instance = await start_postroom(make_settings(**sections))
        running.append(instance)
        return instance

    yield launch
    for instance in running:
        if not instance.task.done():
            await instance.stop()


@pytest.fixture
async def postroom(start: Callable[..., Any]) -> Running:
    running: Running = await start()
    return running


# -- Postroom as a separate process ---------------------------------------------------------------

_LISTENING = re.compile(r"SMTP 127\.0\.0\.1:(\d+); API (http://127\.0\.0\.1:\d+)")


@dataclass
class Process:
    proc: subprocess.Popen[str]
    smtp_port: int
    api_url: str
    drain: threading.Thread
    output: list[str]  # every line printed so far (stdout and stderr), kept by `drain`

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self._reap()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self._reap()

    def _reap(self) -> int:
        code = self.proc.wait(30)
        self.drain.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def postroom_cli(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=check, env=_env(),
    )


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("POSTROOM_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
    }
    return env | (extra or {})


#: Every `postroom serve` a test started; `_no_postroom_left` kills what is still running.
_spawned: list[Process] = []


@pytest.fixture(autouse=True)
def _no_postroom_left() -> Iterator[None]:
    """A test that fails before it stops its `postroom serve` must not leave it (and its
    workers) running for the rest of the suite, and after it, using CPU and ports."""
    yield
    while _spawned:
        left = _spawned.pop()
        if left.proc.poll() is None:
            left.kill()


def spawn_postroom(config: Path, env: dict[str, str] | None = None) -> Process:
    """Start `postroom serve` (with `env` added) and wait for the line saying where it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "--config", str(config), "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(env),
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if m := _LISTENING.search(line):
            # Keep draining the pipe so the child never blocks on a full buffer.
            drain = threading.Thread(target=_keep, args=(proc.stdout, seen), daemon=True)
            drain.start()
            started = Process(proc, int(m.group(1)), m.group(2), drain, seen)
            _spawned.append(started)
            return started
        if len(seen) > 200:
            break
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError("postroom did not start:\n" + "".join(seen))


def _keep(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """A TOML config file from nested dicts (strings, numbers, lists of those)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # the helper itself must write valid TOML
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
