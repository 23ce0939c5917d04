"""Encryption at rest: no plaintext body or DKIM key in the database, key checks, rotation."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest

from config import Settings, decode_key
from relay.dkim import generate_keys
from relay.service import StartupError
from store import MessageStatus, Source, Spool, Submission
from store.crypto import BODY, DKIM, MAGIC, KeyMismatch, Sealer
from tests.conftest import Running
from tests.support import MxSink, wait_until
from tests.test_queue_tools import run

SECRET_TEXT = b"the launch code is 0451-SWORDFISH"
CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\n" + SECRET_TEXT + b"\r\n"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def database_bytes(settings: Settings) -> bytes:
    spool = settings.spool_path
    return b"".join(p.read_bytes() for p in spool.parent.glob("spool.sqlite3*"))


async def test_bodies_and_dkim_keys_are_sealed_and_keys_are_checked(
    start: Any, mx_sink: MxSink, make_settings: Any, tmp_path: Path
):
    key = new_key()
    running: Running = await start(storage={"encryption_key": key})
    dkim = generate_keys("acme.test", "s1", True, time.time())
    await running.spool.add_domain(dkim)
    assert await running.spool.domain_keys("acme.test") == dkim
    accepted = await running.spool.accept(
        Submission("app@acme.test", ("user@example.test",), CONTENT, Source.API)
    )

    async def delivered() -> bool:
        message = await running.spool.get_message(accepted.id)
        return message.status is MessageStatus.DELIVERED

    await wait_until(delivered)
    [received] = mx_sink.messages
    assert SECRET_TEXT in received.data and b"DKIM-Signature:" in received.data
    settings = running.service.settings
    stored = database_bytes(settings)  # while serving: the WAL holds the recent writes
    await running.stop()
    stored += database_bytes(settings)
    assert SECRET_TEXT not in stored
    pem_line = dkim.rsa_key.splitlines()[5]
    assert len(pem_line) > 40 and pem_line not in stored
    assert dkim.ed25519_key is not None and dkim.ed25519_key not in stored

    # A wrong or missing key is a clear start-up error.
    with pytest.raises(StartupError, match="not the key this spool was encrypted with"):
        await start(storage={"encryption_key": new_key()})
    with pytest.raises(StartupError, match=r"encrypted at rest: set storage\.encryption_key"):
        await start()

    # Rotation: the new key, the old one as previous, `db rotate-key`; then the new key alone.
    newer = new_key()
    config = tmp_path / "rotate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{settings.server.data_dir}"\n'
        f'[storage]\nencryption_key = "{newer}"\nprevious_encryption_key = "{key}"\n'
    )
    rotated = await run(config, "db", "rotate-key", "--json")
    assert rotated.exit_code == 0, rotated.output
    assert '"bodies": 1' in rotated.stdout and '"domains": 1' in rotated.stdout
    spool = await Spool.open(make_settings(storage={"encryption_key": newer}))
    try:
        assert await spool.domain_keys("acme.test") == dkim
    finally:
        await spool.close()
    with pytest.raises(StartupError, match="not the key"):
        await start(storage={"encryption_key": key})


def test_a_key_must_be_32_bytes_of_base64():
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(storage={"encryption_key": base64.b64encode(b"short").decode()})
    with pytest.raises(ValueError, match="not base64"):
        Settings(storage={"encryption_key": "not base64!"})


async def test_without_a_key_the_body_is_stored_as_given(postroom: Running):
    # The control for the grep above: the same search finds an unencrypted body.
    await postroom.spool.accept(
        Submission("app@acme.test", ("user@example.test",), CONTENT, Source.API)
    )
    assert SECRET_TEXT in database_bytes(postroom.service.settings)



_RIGHT_KEY = decode_key(new_key())
_SEALED = Sealer(current=_RIGHT_KEY).seal(SECRET_TEXT, BODY)


@pytest.mark.parametrize(
    ("value", "purpose"),
    [
        pytest.param(_SEALED[:-1] + bytes([_SEALED[-1] ^ 1]), BODY, id="flipped byte"),
        pytest.param(_SEALED[: len(MAGIC) + 4 + 3], BODY, id="cut inside the nonce"),
        pytest.param(_SEALED[: len(MAGIC) + 16 + 5], BODY, id="cut inside the tag"),
        pytest.param(_SEALED, DKIM, id="another purpose"),
        pytest.param(
            Sealer(current=decode_key(new_key())).seal(SECRET_TEXT, BODY), BODY, id="another key"
        ),
    ],
)
def test_a_value_that_does_not_open_raises_key_mismatch(value: bytes, purpose: bytes):
    # The spool turns KeyMismatch into a failed message or UnreadableKeys
    # (tests/test_damaged_rows.py): the AEAD library's own errors must not get past `open`.
    sealer = Sealer(current=_RIGHT_KEY)
    assert sealer.open(_SEALED, BODY) == SECRET_TEXT
    with pytest.raises(KeyMismatch):
        sealer.open(value, purpose)
