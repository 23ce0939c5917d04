"""SMTP worker processes (`smtp.workers`): the limits stay the server's, and workers come and go.

The SMTP behaviour itself runs both ways in test_smtp.py, test_submission.py, the durability and
drain tests (`WITH_AND_WITHOUT_WORKERS`); these are the properties only workers can break.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config import load_settings
from tests.conftest import (
    Running,
    postroom_cli,
    settings_data,
    spawn_postroom,
    start_postroom,
    write_config,
)
from tests.support import DnsServer, MxSink, RawSmtp, wait_until

MESSAGE = b"From: cron@acme.test\r\nTo: user@example.test\r\nSubject: via a worker\r\n\r\nhi\r\n"


async def start_with_workers(start: Callable[..., Any], **smtp: Any) -> Running:
    running: Running = await start(smtp={"workers": 2, **smtp})
    assert running.service.workers is not None and len(running.service.workers.pids) == 2
    return running


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def open_session(port: int) -> tuple[RawSmtp, str]:
    client = await RawSmtp.open(port)
    return client, client.greeting


async def test_session_limits_count_every_worker_together(start: Callable[..., Any]):
    postroom = await start_with_workers(start, max_sessions_per_ip=1)
    first, greeting = await open_session(postroom.smtp_port)
    assert greeting.startswith("220 ")
    # Whichever worker the kernel hands them to, the one session from this address is counted.
    for _ in range(6):
        refused, greeting = await open_session(postroom.smtp_port)
        assert greeting.startswith("421 4.7.0 Too many connections")
        await refused.close()
    await first.command("QUIT")
    await first.close()

    async def admitted() -> bool:
        client, greeting = await open_session(postroom.smtp_port)
        await client.close()
        return greeting.startswith("220 ")

    await wait_until(admitted, message="the ended session was never released")


def plain(secret: str) -> str:
    return base64.b64encode(b"\0anyone\0" + secret.encode()).decode()


async def test_an_auth_lock_out_holds_on_every_worker(
    start: Callable[..., Any], client_tls: ssl.SSLContext
):
    postroom = await start_with_workers(start, auth_max_failures=3)

    async def wrong_key() -> str:
        """One failed AUTH on a new connection (the kernel picks the worker): its reply."""
        client, _ = await open_session(postroom.smtp_port)
        await client.command("EHLO client.test")
        await client.command("STARTTLS")
        await client.start_tls(client_tls)
        await client.command("EHLO client.test")
        reply = await client.command(f"AUTH PLAIN {plain('pr_wrong')}")
        await client.close()
        return reply

    assert (await wrong_key()).startswith("535 5.7.8")
    assert (await wrong_key()).startswith("535 5.7.8")
    assert (await wrong_key()).startswith("421 4.7.0")
    # The third failure locked the address out: every worker now refuses it at once.
    for _ in range(4):
        client, greeting = await open_session(postroom.smtp_port)
        assert greeting.startswith("421 4.7.0 Too many failed authentications")
        await client.close()


def send(port: int, message: bytes = MESSAGE) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        client.mail("cron@acme.test")
        client.rcpt("user@example.test")
        code, reply = client.data(message)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


async def test_an_idempotency_key_is_one_message_whichever_worker_takes_it(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start_with_workers(start, trusted_networks=["127.0.0.0/8"])
    keyed = b"Postroom-Idempotency-Key: order-42\r\n" + MESSAGE
    ids = [await asyncio.to_thread(send, postroom.smtp_port, keyed) for _ in range(6)]
    assert len(set(ids)) == 1
    await mx_sink.wait_for_messages(1)
    assert len(await postroom.spool.list_messages(limit=10)) == 1


async def test_a_dead_worker_is_started_again_and_its_sessions_are_released(
    start: Callable[..., Any], mx_sink: MxSink, caplog: pytest.LogCaptureFixture
):
    postroom = await start_with_workers(
        start, trusted_networks=["127.0.0.0/8"], max_sessions=1
    )
    workers = postroom.service.workers
    assert workers is not None
    held, greeting = await open_session(postroom.smtp_port)  # the one session allowed
    assert greeting.startswith("220 ")
    before = workers.pids
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: not set(before) & set(workers.pids) and len(workers.pids) == 2,
                     message="the workers were not started again")
    assert await held.is_closed_by_server()
    await held.close()
    # What the dead workers had counted is free again: a new session may start and send.
    message_id = await asyncio.to_thread(send, postroom.smtp_port)
    [received] = await mx_sink.wait_for_messages(1)
    assert b"Subject: via a worker" in received.data
    assert (await postroom.spool.get_message(message_id)) is not None
    assert "died with exit status -9: starting it again" in caplog.text
    async with postroom.http() as http:

        async def both_running() -> bool:
            return counters((await http.get("/metrics")).text)["postroom_smtp_workers"] == 2

        await wait_until(both_running, message="/metrics does not count 2 running workers")
        found = counters((await http.get("/metrics")).text)
    assert found["postroom_smtp_worker_restarts_total"] == 2


async def test_a_worker_stopped_by_sigterm_finishes_its_transaction_and_is_replaced(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start_with_workers(start, trusted_networks=["127.0.0.0/8"])
    workers = postroom.service.workers
    assert workers is not None
    clients = [await RawSmtp.open(postroom.smtp_port) for _ in range(6)]
    for i, client in enumerate(clients):  # a transaction open on every worker, most likely
        assert (await client.command("EHLO client.test")).startswith("250")
        assert (await client.command("MAIL FROM:<cron@acme.test>")).startswith("250")
        assert (await client.command(f"RCPT TO:<user{i}@example.test>")).startswith("250")
    before = workers.pids
    os.kill(before[0], signal.SIGTERM)  # an operator's kill, not a shutdown
    await asyncio.sleep(0.2)
    # Its transactions finish with a real 250, the others' too.
    for client in clients:
        assert (await client.command("DATA")).startswith("354")
        assert (await client.command(MESSAGE + b".")).startswith("250 2.0.0 Ok: queued as")
        await client.close()
    await wait_until(lambda: before[0] not in workers.pids and len(workers.pids) == 2,
                     message="the stopped worker was not replaced")
    await mx_sink.wait_for_messages(6)
    assert postroom.service.readiness.is_ready
    message_id = await asyncio.to_thread(send, postroom.smtp_port)  # the new one serves
    assert (await postroom.spool.get_message(message_id)) is not None


async def test_a_stuck_worker_is_killed_and_replaced(
    start: Callable[..., Any], mx_sink: MxSink, caplog: pytest.LogCaptureFixture
):
    postroom = await start_with_workers(
        start, trusted_networks=["127.0.0.0/8"], worker_watchdog="0.6s"
    )
    workers = postroom.service.workers
    assert workers is not None
    stuck = workers.pids[0]
    os.kill(stuck, signal.SIGSTOP)  # its loop answers nothing any more, as if it hung
    try:
        await wait_until(lambda: stuck not in workers.pids and len(workers.pids) == 2,
                         timeout=10, message="the stuck worker was not replaced")
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGCONT)
    assert f"(pid {stuck}) did not answer for 0.6s: killed" in caplog.text
    message_id = await asyncio.to_thread(send, postroom.smtp_port)
    assert (await postroom.spool.get_message(message_id)) is not None


def counters(text: str) -> dict[str, float]:
    return {
        m["name"]: float(m["value"])
        for m in re.finditer(r"^(?P<name>postroom_smtp_\w+) (?P<value>\S+)$", text, re.M)
    }


async def test_metrics_count_the_sessions_of_every_worker(
    start: Callable[..., Any], mx_sink: MxSink
):
    postroom = await start_with_workers(start, trusted_networks=["127.0.0.0/8"])
    for _ in range(5):
        await asyncio.to_thread(send, postroom.smtp_port)
    await mx_sink.wait_for_messages(5)
    async with postroom.http() as http:

        async def settled() -> bool:
            found = counters((await http.get("/metrics")).text)
            return found.get("postroom_smtp_sessions_active") == 0

        await wait_until(settled, message="sessions still counted as active")
        found = counters((await http.get("/metrics")).text)
    assert found["postroom_smtp_sessions_total"] == 5


@pytest.mark.slow
async def test_workers_leave_when_the_service_is_killed(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert: tuple[Path, Path]
):
    data = settings_data(tmp_path, dns, mx_sink.port, server_cert)
    data["smtp"].update(workers=2, trusted_networks=["127.0.0.0/8"])
    config = write_config(tmp_path / "postroom.toml", data)
    await asyncio.to_thread(postroom_cli, config, "init")
    proc = await asyncio.to_thread(spawn_postroom, config)
    [line] = [line for line in proc.output if "smtp_workers=" in line]
    pids = [int(pid) for pid in line.rsplit("smtp_workers=", 1)[1].split(",")]
    assert len(pids) == 2 and all(alive(pid) for pid in pids)
    acknowledged = await asyncio.to_thread(send, proc.smtp_port)
    await asyncio.to_thread(proc.kill)  # SIGKILL: no drain, nothing to tell the workers
    await wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10,
                     message="a worker outlived the service")
    # A new service starts, and what was acknowledged before the kill is delivered.
    proc = await asyncio.to_thread(spawn_postroom, config)
    try:
        await wait_until(lambda: any(b"via a worker" in m.data for m in mx_sink.messages),
                         timeout=30, message=f"{acknowledged} was lost")
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


async def test_api_sends_composed_in_workers_survive_reloads_and_restarts(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert
):
    """Each worker holds the settings the service started with, and an API send sends a
    stand-in for them (relay/ipc.py `StartSettings`): after reloads, and in a worker started
    after one, the stand-in must still mean them, or every API send would fail."""
    data = settings_data(tmp_path, dns, mx_sink.port, server_cert)
    data["smtp"]["workers"] = 1
    config = write_config(tmp_path / "postroom.toml", data)
    postroom = await start_postroom(load_settings(config))
    try:
        workers = postroom.service.workers
        assert workers is not None
        key = await postroom.new_key()
        sent = 0

        async def send_via_api() -> None:
            nonlocal sent
            async with postroom.http(key) as http:
                response = await http.post("/v1/messages", json={
                    "from": "app@acme.test", "to": f"user{sent}@example.test",
                    "subject": "composed in a worker", "text": "hi",
                })
            assert response.status_code == 202, response.text
            sent += 1

        await send_via_api()
        for timeout in (7, 8):
            data["server"]["shutdown_timeout"] = timeout
            write_config(config, data)
            assert await postroom.service.reload()
            await send_via_api()
        [pid] = workers.pids
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: workers.pids and workers.pids != [pid] and workers.width == 1,
                         message="the worker was not started again")
        await send_via_api()
        received = await mx_sink.wait_for_messages(sent)
        assert sorted(m.rcpt_tos[0] for m in received) == [f"user{i}@example.test"
                                                          for i in range(sent)]
    finally:
        await postroom.stop()
