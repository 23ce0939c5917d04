"""One damaged row never stops delivery: a stored body or DKIM key that does not decrypt fails
its own mail (`failed`, `email.failed`, the reason on the message) while everything else goes
out. Also: `Spool.open` leaves nothing behind when a reader connection cannot be opened."""

from __future__ import annotations

import logging
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from config import Settings, decode_key
from relay.dkim import generate_keys
from store import DomainKeys, RecipientStatus, Source, Spool, SpoolUnavailable, Submission
from store.crypto import BODY, Sealer
from tests.conftest import Running
from tests.support import MxSink
from tests.test_delivery import settled
from tests.test_encryption import new_key

SECRET_TEXT = b"the vault code is 7734-BLUEBIRD"


def content(sender: str, subject: str) -> bytes:
    return (
        f"From: {sender}\r\nTo: someone@example.test\r\nSubject: {subject}\r\n\r\n".encode()
        + SECRET_TEXT + b"\r\n"
    )


async def queue_offline(
    settings: Settings, submissions: Sequence[Submission], domains: Sequence[DomainKeys] = ()
) -> list[str]:
    """Accept messages (and add sending domains) with no engine running: they wait in the spool."""
    spool = await Spool.open(settings)
    try:
        for keys in domains:
            await spool.add_domain(keys)
        return [(await spool.accept(s)).id for s in submissions]
    finally:
        await spool.close()


def stored(settings: Settings, query: str, params: dict[str, Any]) -> bytes:
    conn = sqlite3.connect(settings.spool_path)
    try:
        return bytes(conn.execute(query, params).fetchone()[0])
    finally:
        conn.close()


def overwrite(settings: Settings, query: str, params: dict[str, Any]) -> None:
    conn = sqlite3.connect(settings.spool_path)
    try:
        with conn:
            assert conn.execute(query, params).rowcount == 1
    finally:
        conn.close()


def flip_last_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 0x01])


@pytest.mark.parametrize("damage", ["flipped byte", "sealed with another key"])
async def test_a_body_that_does_not_decrypt_fails_alone(
    damage: str,
    start: Callable[..., Any],
    make_settings: Callable[..., Settings],
    mx_sink: MxSink,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    key = new_key()
    settings = make_settings(storage={"encryption_key": key})
    broken_id, good_id = await queue_offline(
        settings,
        [
            Submission("app@acme.test", ("broken@example.test",), content("app@acme.test", "a"),
                       Source.API),
            Submission("app@acme.test", ("good@example.test",), content("app@acme.test", "b"),
                       Source.API),
        ],
    )
    body = stored(settings, "SELECT body FROM messages WHERE id = :id", {"id": broken_id})
    if damage == "flipped byte":
        body = flip_last_byte(body)
    else:
        plain = Sealer(current=decode_key(key)).open(body, BODY)
        body = Sealer(current=decode_key(new_key())).seal(plain, BODY)
    overwrite(settings, "UPDATE messages SET body = :body WHERE id = :id",
              {"body": body, "id": broken_id})

    running: Running = await start(storage={"encryption_key": key})
    broken = await settled(running, broken_id)
    good = await settled(running, good_id)

    # The other message went out, to the MX sink, whole.
    assert [r.status for r in good.recipients] == [RecipientStatus.DELIVERED]
    [received] = await mx_sink.wait_for_messages(1)
    assert received.rcpt_tos == ["good@example.test"] and SECRET_TEXT in received.data

    # The damaged one is failed at once, with its event and a reason that says why.
    [rcpt] = broken.recipients
    assert rcpt.status is RecipientStatus.FAILED and rcpt.attempts == 1
    assert [e.type.value for e in broken.events] == ["email.queued", "email.failed"]
    assert rcpt.last_reply is not None and (rcpt.last_reply.code, rcpt.last_reply.enhanced) == (
        554, "5.3.0"
    )
    reason = rcpt.last_reply.text
    assert reason.startswith("the stored message body cannot be decrypted: ")
    assert broken.events[1].data["reason"] == reason
    async with running.http(await running.new_key()) as client:
        response = await client.get(f"/v1/messages/{broken_id}")
    assert response.status_code == 200, response.text
    shown = response.json()
    assert shown["status"] == "failed"
    assert shown["recipients"][0]["last_reply"]["text"] == reason

    # The log line of the transition names it; neither the key nor the body is logged.
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith(f"{broken_id}: to=<broken@example.test>") and "status=failed" in line
        for line in lines
    )
    logged = "\n".join(lines)
    assert key not in logged and SECRET_TEXT.decode() not in logged


async def test_a_dkim_key_that_does_not_decrypt_fails_its_domain_alone(
    start: Callable[..., Any],
    make_settings: Callable[..., Settings],
    mx_sink: MxSink,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    key = new_key()
    settings = make_settings(storage={"encryption_key": key})
    acme = generate_keys("acme.test", "s1", False, time.time())
    other = generate_keys("other.test", "s2", True, time.time())
    ids = await queue_offline(
        settings,
        [
            Submission("app@acme.test", ("a1@example.test",), content("app@acme.test", "1"),
                       Source.API),
            Submission("app@other.test", ("b@example.test",), content("app@other.test", "2"),
                       Source.API),
            # A second message of the broken domain: the key ring's cached failure fails it too.
            Submission("app@acme.test", ("a2@example.test",), content("app@acme.test", "3"),
                       Source.API),
        ],
        domains=[acme, other],
    )
    rsa = stored(settings, "SELECT rsa_key FROM domains WHERE name = 'acme.test'", {})
    overwrite(settings, "UPDATE domains SET rsa_key = :key WHERE name = 'acme.test'",
              {"key": flip_last_byte(rsa)})

    running: Running = await start(storage={"encryption_key": key})
    first, good, second = [await settled(running, message_id) for message_id in ids]

    assert [r.status for r in good.recipients] == [RecipientStatus.DELIVERED]
    [received] = await mx_sink.wait_for_messages(1)
    assert received.rcpt_tos == ["b@example.test"]
    assert b"DKIM-Signature:" in received.data and b"d=other.test" in received.data

    pem_lines = [line.decode() for line in acme.rsa_key.splitlines()[1:-1]]
    for message in (first, second):
        [rcpt] = message.recipients
        # Failed at the first attempt, not deferred until the retries run out.
        assert rcpt.status is RecipientStatus.FAILED and rcpt.attempts == 1
        assert [e.type.value for e in message.events] == ["email.queued", "email.failed"]
        assert rcpt.last_reply is not None
        reason = rcpt.last_reply.text
        assert reason.startswith("the DKIM key of acme.test (selector s1) cannot be decrypted")
        assert not any(line in reason for line in pem_lines)

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert key not in logged and not any(line in logged for line in pem_lines)
    assert "Traceback" not in caplog.text  # an expected outcome, not an internal error


def _spool_writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "spool-writer"]


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists fds through /proc")
async def test_spool_open_closes_the_writer_when_a_reader_does_not_open(
    make_settings: Callable[..., Settings],
):
    settings = make_settings()
    await (await Spool.open(settings, readers=0)).close()  # created: no migration runs again
    # The descriptors the writer alone holds: opening takes the lowest free numbers, so the
    # same open takes the same ones again.
    before = _open_fds()
    spool = await Spool.open(settings, readers=0)
    with_writer = _open_fds()
    await spool.close()
    assert _open_fds() == before and not _spool_writer_threads()

    # Cap descriptors below the first number the writer leaves free (EMFILE, a real fault):
    # the writer opens, the first reader cannot.
    cap = min(n for n in range(len(with_writer) + 1) if n not in with_writer)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    try:
        with pytest.raises(SpoolUnavailable, match="unable to open database file"):
            await Spool.open(settings, readers=2)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not _spool_writer_threads()
    assert _open_fds() == before
