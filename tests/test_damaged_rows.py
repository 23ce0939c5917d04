"""One damaged row never stops delivery: a stored body or DKIM key that does not decrypt fails
its own mail (`failed`, `email.failed`, the reason on the message) while everything else goes
out. Also: `Spool.open` leaves nothing behind when a reader connection cannot be opened."""

from __future__ import annotations

import json
import logging
import os
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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
from tests.test_queue_tools import run

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


async def test_a_damaged_dkim_key_shows_as_damaged_and_never_fails_the_domain_list(
    start: Callable[..., Any], make_settings: Callable[..., Settings]
):
    key = new_key()
    settings = make_settings(storage={"encryption_key": key})
    acme = generate_keys("acme.test", "s1", True, time.time())
    other = generate_keys("other.test", "s2", False, time.time())
    await queue_offline(settings, [], domains=[acme, other])
    rsa = stored(settings, "SELECT rsa_key FROM domains WHERE name = 'acme.test'", {})
    overwrite(settings, "UPDATE domains SET rsa_key = :key WHERE name = 'acme.test'",
              {"key": flip_last_byte(rsa)})

    running: Running = await start(storage={"encryption_key": key})
    async with running.http(await running.new_key()) as http:
        listed = await http.get("/v1/domains")
        assert listed.status_code == 200, listed.text
        by_name = {d["name"]: d for d in listed.json()["data"]}
        shown = await http.get("/v1/domains/acme.test")
        assert shown.status_code == 200, shown.text
        verified = await http.post("/v1/domains/acme.test/verify")
        good = (await http.get("/v1/domains/other.test")).json()

        # Replacing the domain, as the problem says, makes it whole again.
        assert (await http.delete("/v1/domains/acme.test")).status_code == 204
        assert (await http.post("/v1/domains", json={"name": "acme.test"})).status_code == 201
        again = (await http.get("/v1/domains/acme.test")).json()

    damaged = by_name["acme.test"]
    assert damaged["status"] == "key_damaged" and damaged["records"] == []
    assert damaged["selector"] == "s1" and damaged["algorithm"] == "both"
    assert "cannot be decrypted" in damaged["problem"]
    assert "postroom domains remove acme.test" in damaged["problem"]
    assert "postroom domains add acme.test" in damaged["problem"]
    assert shown.json() == damaged
    assert by_name["other.test"]["status"] == "ok" and by_name["other.test"]["records"]
    assert good == by_name["other.test"]
    # Where the key itself is needed, the error says it is damaged, not "try again later".
    assert verified.status_code == 500, verified.text
    assert verified.json()["error"] == "dkim_key_damaged"
    assert "postroom domains remove acme.test" in verified.json()["message"]
    assert "try again" not in verified.json()["message"]
    assert again["status"] == "ok" and again["records"]
    pem_lines = [line.decode() for line in acme.rsa_key.splitlines()[1:-1]]
    answers = listed.text + shown.text + verified.text
    assert key not in answers and not any(line in answers for line in pem_lines)


async def test_rotate_key_skips_and_names_damaged_rows_and_re_encrypts_the_rest(
    make_settings: Callable[..., Settings], tmp_path: Path
):
    key, newer = new_key(), new_key()
    settings = make_settings(storage={"encryption_key": key})
    acme = generate_keys("acme.test", "s1", True, time.time())
    other = generate_keys("other.test", "s2", True, time.time())
    ids = await queue_offline(
        settings,
        [Submission("app@acme.test", (f"u{n}@example.test",), content("app@acme.test", str(n)),
                    Source.API) for n in range(3)],
        domains=[acme, other],
    )
    body = stored(settings, "SELECT body FROM messages WHERE id = :id", {"id": ids[1]})
    overwrite(settings, "UPDATE messages SET body = :body WHERE id = :id",
              {"body": flip_last_byte(body), "id": ids[1]})
    ed = stored(settings, "SELECT ed25519_key FROM domains WHERE name = 'acme.test'", {})
    overwrite(settings, "UPDATE domains SET ed25519_key = :key WHERE name = 'acme.test'",
              {"key": flip_last_byte(ed)})

    config = tmp_path / "rotate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{settings.server.data_dir}"\n'
        f'[storage]\nencryption_key = "{newer}"\nprevious_encryption_key = "{key}"\n'
    )
    rotated = await run(config, "db", "rotate-key", "--json")
    assert rotated.exit_code == 1, rotated.output
    assert json.loads(rotated.stdout) == {
        "bodies": 2, "domains": 1, "damaged_messages": [ids[1]], "damaged_domains": ["acme.test"]
    }
    human = await run(config, "db", "rotate-key")  # again: nothing left to do but the damage
    assert human.exit_code == 1
    assert "skipped 1 damaged body(ies) that open with neither key" in human.stdout
    assert ids[1] in human.stdout and "postroom domains remove acme.test" in human.stdout
    assert key not in rotated.output + human.output

    # The rest opens with the new key alone.
    newer_only = make_settings(storage={"encryption_key": newer})
    sealer = Sealer(current=decode_key(newer))
    for message_id in (ids[0], ids[2]):
        sealed = stored(newer_only, "SELECT body FROM messages WHERE id = :id", {"id": message_id})
        assert SECRET_TEXT in sealer.open(sealed, BODY)
    spool = await Spool.open(newer_only)
    try:
        assert await spool.domain_keys("other.test") == other
        [(_, damage)] = [d for d in await spool.inspect_domains() if d[0].name == "acme.test"]
        assert damage is not None and damage.domain == "acme.test"
    finally:
        await spool.close()


async def test_domains_list_and_show_name_a_damaged_key_and_list_the_rest(
    make_settings: Callable[..., Settings], tmp_path: Path
):
    key = new_key()
    settings = make_settings(storage={"encryption_key": key})
    acme = generate_keys("acme.test", "s1", False, time.time())
    other = generate_keys("other.test", "s2", False, time.time())
    await queue_offline(settings, [], domains=[acme, other])
    rsa = stored(settings, "SELECT rsa_key FROM domains WHERE name = 'acme.test'", {})
    overwrite(settings, "UPDATE domains SET rsa_key = :key WHERE name = 'acme.test'",
              {"key": flip_last_byte(rsa)})
    config = tmp_path / "cli.toml"
    config.write_text(
        f'[server]\ndata_dir = "{settings.server.data_dir}"\n[storage]\nencryption_key = "{key}"\n'
    )

    listed = await run(config, "domains", "list", "--json")
    shown = await run(config, "domains", "show", "acme.test")

    assert listed.exit_code == 0, listed.output
    by_name = {d["name"]: d for d in json.loads(listed.stdout)}
    assert by_name["other.test"]["status"] == "ok" and by_name["other.test"]["records"]
    assert by_name["acme.test"]["status"] == "key_damaged"
    assert "postroom domains remove acme.test" in by_name["acme.test"]["problem"]
    assert shown.exit_code == 1
    assert "postroom domains remove acme.test" in shown.output
    assert "Traceback" not in listed.output + shown.output and key not in shown.output
