"""Stopping and reloading: the drain (421, 503, transactions finish), SIGTERM, SIGHUP, sd_notify."""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from config import Settings, load_settings
from store import RecipientStatus, Spool
from tests.conftest import (
    WITH_AND_WITHOUT_WORKERS,
    Process,
    postroom_cli,
    settings_data,
    spawn_postroom,
    start_postroom,
    write_config,
)
from tests.support import DnsServer, MxSink, wait_until

MESSAGE = b"From: cron@acme.test\r\nSubject: drain\r\n\r\nheld open during the drain\r\n"


class Client:
    """A raw SMTP client on asyncio streams: the test holds its transactions open at will."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> tuple[Client, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        return client, await client.reply()

    async def reply(self) -> str:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                break
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                break
        return "\n".join(lines)

    async def send(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def is_closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""

    def close(self) -> None:
        self.writer.close()


@WITH_AND_WITHOUT_WORKERS
async def test_drain_refuses_new_work_and_finishes_the_open_transaction(
    make_settings: Callable[..., Settings],
):
    settings = make_settings(smtp={"trusted_networks": ["127.0.0.0/8"]},
                             server={"shutdown_timeout": "30s"})
    running = await start_postroom(settings)
    port = running.smtp_port
    idle, greeting = await Client.connect(port)
    assert greeting.startswith("220 ")
    assert (await idle.send("EHLO idle.test")).startswith("250")
    busy, _ = await Client.connect(port)
    await busy.send("EHLO busy.test")
    assert (await busy.send("MAIL FROM:<cron@acme.test>")).startswith("250")
    assert (await busy.send("RCPT TO:<user@example.test>")).startswith("250")

    running.service.stop()  # the open transaction holds the drain open until it ends
    await wait_until(lambda: running.service.readiness.is_stopping)

    # The idle session is told and closed; a new one is refused; HTTP answers 503.
    assert (await idle.reply()).startswith("421 4.3.2")
    assert await idle.is_closed_by_server()
    late, greeting = await Client.connect(port)
    assert greeting.startswith("421 4.3.2")
    assert await late.is_closed_by_server()
    async with running.http() as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        refused = await http.post("/v1/messages", json={})
        assert refused.status_code == 503
        assert refused.json()["error"] == "service_unavailable"
        assert (await http.get("/metrics")).status_code == 200  # watch the drain
    assert not running.task.done()

    # The transaction in flight finishes with a real 250, then the session is closed.
    assert (await busy.send("DATA")).startswith("354")
    accepted = await busy.send(MESSAGE + b".\r\n")
    assert accepted.startswith("250 2.0.0 Ok: queued as msg_")
    assert (await busy.reply()).startswith("421 4.3.2")
    assert await busy.is_closed_by_server()
    for client in (idle, late, busy):
        client.close()

    await asyncio.wait_for(running.task, 15)  # the service stops once nothing is in flight
    spool = await Spool.open(settings, readers=1)
    try:
        message = await spool.get_message(accepted.rsplit(" ", 1)[1])
        assert [r.status for r in message.recipients] == [RecipientStatus.QUEUED]
    finally:
        await spool.close()


slow = pytest.mark.slow


def process_config(tmp_path: Path, dns: DnsServer, mx_port: int, server_cert, **sections: Any
                   ) -> Path:
    data = settings_data(tmp_path, dns, mx_port, server_cert)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return write_config(tmp_path / "postroom.toml", data)


@slow
@WITH_AND_WITHOUT_WORKERS
async def test_sigterm_under_load_loses_nothing_and_exits_0(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, smtp_workers: int
):
    config = process_config(tmp_path, dns, mx_sink.port, server_cert,
                            smtp={"trusted_networks": ["127.0.0.0/8"], "workers": smtp_workers})
    await asyncio.to_thread(postroom_cli, config, "init")
    created = await asyncio.to_thread(
        postroom_cli, config, "keys", "create", "--name", "load", "--json"
    )
    key = json.loads(created.stdout)["key"]
    proc = await asyncio.to_thread(spawn_postroom, config)
    acked: list[str] = []  # recipients of acknowledged messages, one recipient each
    counter = iter(range(1_000_000))

    async def http_sender() -> None:
        async with httpx.AsyncClient(base_url=proc.api_url, timeout=10) as http:
            while True:
                rcpt = f"http{next(counter)}@example.test"
                try:
                    response = await http.post(
                        "/v1/messages", headers={"Authorization": f"Bearer {key}"},
                        json={"from": "app@acme.test", "to": rcpt, "subject": "load",
                              "text": "hello"},
                    )
                except httpx.TransportError:
                    return  # the listener is gone: the service has stopped
                if response.status_code == 503:
                    return
                assert response.status_code == 202, response.text
                acked.append(rcpt)

    def smtp_sender() -> None:
        while True:
            rcpt = f"smtp{next(counter)}@example.test"
            try:
                client = smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10)
            except smtplib.SMTPConnectError as exc:
                assert exc.smtp_code == 421  # the drain: new sessions are refused
                return
            except ConnectionError:
                return  # the listener is gone: the service has stopped
            try:
                client.sendmail("cron@acme.test", [rcpt], MESSAGE)
            except smtplib.SMTPRecipientsRefused as exc:
                assert {code for code, _ in exc.recipients.values()} == {421}
                return
            except smtplib.SMTPResponseException as exc:
                assert exc.smtp_code == 421, exc  # an idle session closed by the drain
                return
            except smtplib.SMTPServerDisconnected:
                return
            finally:
                client.close()
            acked.append(rcpt)  # 250: committed

    senders = [asyncio.create_task(http_sender()) for _ in range(4)]
    senders += [asyncio.create_task(asyncio.to_thread(smtp_sender)) for _ in range(4)]
    await wait_until(lambda: len(acked) >= 40, timeout=20, message="no load")
    code = await asyncio.to_thread(proc.terminate)  # SIGTERM in the middle of the load
    await asyncio.gather(*senders)
    assert code == 0, "".join(proc.output)
    assert "Traceback" not in "".join(proc.output)
    assert any("postroom stopped" in line for line in proc.output)

    # Every acknowledged message arrives, what was delivered before the stop and after it.
    proc = await asyncio.to_thread(spawn_postroom, config)
    try:
        def delivered() -> set[str]:
            return {r.rcpt_tos[0] for r in mx_sink.messages}

        await wait_until(lambda: set(acked) <= delivered(), timeout=30,
                         message=f"{len(set(acked) - delivered())} acknowledged message(s) lost")
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


def write_cert(ca: trustme.CA, folder: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("postroom.test", "localhost", "127.0.0.1")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


def peer_certificate(port: int, tls: ssl.SSLContext) -> bytes:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=tls)
        assert isinstance(client.sock, ssl.SSLSocket)
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        return der


def has_line(proc: Process, *words: str) -> bool:
    return any(all(w in line for w in words) for line in list(proc.output))


@slow
@WITH_AND_WITHOUT_WORKERS
async def test_sighup_swaps_the_certificate_and_refuses_a_broken_config(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, ca: trustme.CA,
    client_tls: ssl.SSLContext, smtp_workers: int,
):
    (tmp_path / "tls").mkdir()
    cert, key = write_cert(ca, tmp_path / "tls")
    config = process_config(tmp_path, dns, mx_sink.port, (cert, key),
                            server={"log_level": "INFO"}, smtp={"workers": smtp_workers})
    await asyncio.to_thread(postroom_cli, config, "init")
    proc = await asyncio.to_thread(spawn_postroom, config)
    try:
        first = await asyncio.to_thread(peer_certificate, proc.smtp_port, client_tls)
        write_cert(ca, tmp_path / "tls")  # renewed in place, as certbot does
        proc.proc.send_signal(1)  # SIGHUP

        async def new_certificate() -> bool:
            return await asyncio.to_thread(peer_certificate, proc.smtp_port, client_tls) != first

        await wait_until(new_certificate, message="STARTTLS still shows the old certificate")
        await wait_until(lambda: has_line(proc, "TLS certificate loaded from", str(cert)))
        second = await asyncio.to_thread(peer_certificate, proc.smtp_port, client_tls)

        # A bad value: refused with the reason, the old config kept.
        good_config = config.read_text()
        config.write_text(good_config.replace('log_level = "INFO"', 'log_level = "LOUD"'))
        proc.proc.send_signal(1)
        await wait_until(lambda: has_line(proc, "reload refused", "server.log_level"))
        # A key that does not match the certificate: refused too, TLS keeps working.
        other = tmp_path / "other"
        other.mkdir()
        _, other_key = write_cert(ca, other)
        config.write_text(good_config.replace(str(key), str(other_key)))
        proc.proc.send_signal(1)
        await wait_until(lambda: has_line(proc, "reload refused", "tls: cannot load"))

        assert await asyncio.to_thread(peer_certificate, proc.smtp_port, client_tls) == second
        async with httpx.AsyncClient(base_url=proc.api_url, timeout=10) as http:
            assert (await http.get("/readyz")).status_code == 200
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0
    assert "Traceback" not in "".join(proc.output)


@slow
async def test_sd_notify_ready_watchdog_reloading_stopping(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert
):
    config = process_config(tmp_path, dns, mx_sink.port, server_cert)
    await asyncio.to_thread(postroom_cli, config, "init")
    name = f"postroom-test-{tmp_path.name}-{id(tmp_path)}"
    address = "@" + name  # the abstract namespace, as systemd may pass it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def receive_until(wanted: str) -> None:
        while not any(wanted in m.split("\n") for m in messages):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 10)
            messages.append(data.decode())

    # WATCHDOG_USEC of 0.2 s: a ping every 0.1 s.
    proc = await asyncio.to_thread(
        spawn_postroom, config, {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    )
    try:
        await receive_until("READY=1")
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert "STATUS=serving" in ready
        # READY=1 came after every listener was bound: the address it names answers.
        assert f"127.0.0.1:{proc.smtp_port}" in ready
        await receive_until("WATCHDOG=1")
        proc.proc.send_signal(1)
        await receive_until("RELOADING=1")
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        messages.clear()
        await receive_until("READY=1")  # the reload is over
    finally:
        code = await asyncio.to_thread(proc.terminate)
    await receive_until("STOPPING=1")
    sock.close()
    assert code == 0


async def test_reload_in_process_applies_live_settings_and_refuses_broken_files(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="relay")
    config = process_config(tmp_path, dns, mx_sink.port, server_cert)
    running = await start_postroom(load_settings(config))
    try:
        process_config(tmp_path, dns, mx_sink.port, server_cert, server={"shutdown_timeout": 7},
                       smtp={"max_recipients": 5}, log={"format": "json"})
        assert await running.service.reload()
        assert running.service.settings.server.shutdown_timeout == 7
        assert "server.shutdown_timeout (5 → 7)" in caplog.text
        assert "log.format (text → json)" in caplog.text
        assert "only applied at the next restart: smtp.max_recipients (100 → 5)" in caplog.text

        config.write_text(config.read_text() + "[server]\n")  # a section twice: not TOML
        assert not await running.service.reload()
        assert "reload refused, the running config stays" in caplog.text
        assert "not valid TOML" in caplog.text
        assert running.service.settings.server.shutdown_timeout == 7
        assert running.service.readiness.is_ready
    finally:
        await running.stop()


async def _half_sent_request(
    port: int, key: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A `POST /v1/messages` whose body stops halfway: its handler waits for the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/messages HTTP/1.1\r\nHost: postroom.test\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n"
                 b'{"from": "app@acme.test", ')
    await writer.drain()
    return reader, writer


@slow
@WITH_AND_WITHOUT_WORKERS
async def test_a_request_still_reading_its_body_at_the_stop_gets_503_and_no_traceback(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, smtp_workers: int
):
    """The HTTP server cancels what is still running when the stop's grace period ends: that
    request is answered like any other refused during a stop, and the log says so in a line."""
    config = process_config(tmp_path, dns, mx_sink.port, server_cert,
                            server={"shutdown_timeout": "2s"}, smtp={"workers": smtp_workers})
    await asyncio.to_thread(postroom_cli, config, "init")
    created = await asyncio.to_thread(
        postroom_cli, config, "keys", "create", "--name", "app", "--json"
    )
    proc = await asyncio.to_thread(spawn_postroom, config)
    port = httpx.URL(proc.api_url).port or 80
    reader, writer = await _half_sent_request(port, json.loads(created.stdout)["key"])
    await asyncio.sleep(0.3)  # the request reached its handler
    code = await asyncio.to_thread(proc.terminate)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    output = "".join(proc.output)
    assert code == 0, output
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(body)["error"] == "service_unavailable"
    assert "Traceback" not in output
    assert "cancelled by the stop" in output
