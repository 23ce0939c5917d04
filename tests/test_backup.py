"""`postroom db backup` under load while serving, and the README restore procedure."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

from store import MessageStatus, Source, Submission
from tests.conftest import Running, postroom_cli, write_config
from tests.support import DnsServer, MxSink, wait_until
from tests.test_queue_tools import cli_config, run

CONTENT = b"From: app@acme.test\r\nSubject: hi\r\n\r\nbody\r\n"


async def accept(running: Running, n: int) -> None:
    await running.spool.accept(
        Submission("app@acme.test", (f"u{n}@example.test",), CONTENT, Source.API)
    )


async def test_backup_under_load_restores_and_delivers(
    start: Any, dns: DnsServer, mx_sink: MxSink, tmp_path: Path
):
    dns.set_servfail("example.test")  # every attempt defers until the restore
    running: Running = await start(delivery={"retry_schedule": ["1h"]})
    config = cli_config(tmp_path, running)
    for n in range(20):
        await accept(running, n)

    stop_loading = asyncio.Event()

    async def load() -> int:
        n = 20
        while not stop_loading.is_set():
            await accept(running, n)
            n += 1
        return n

    loader = asyncio.create_task(load())
    backup = tmp_path / "backups" / "spool.sqlite3"
    backup.parent.mkdir()
    made = await run(config, "db", "backup", str(backup), "--json")
    stop_loading.set()
    accepted = await loader
    assert made.exit_code == 0, made.output
    info = json.loads(made.stdout)
    assert 20 <= info["messages"] <= accepted
    again = await run(config, "db", "backup", str(backup))
    assert again.exit_code == 1 and "exists" in again.output

    # The snapshot is consistent: every message has its recipient and its queued event.
    with sqlite3.connect(backup) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute(
            "SELECT count(*) FROM messages m WHERE NOT EXISTS "
            "(SELECT 1 FROM recipients r WHERE r.message_seq = m.seq) OR NOT EXISTS "
            "(SELECT 1 FROM events e WHERE e.message_seq = m.seq AND e.type = 'email.queued')"
        ).fetchone()[0] == 0
    assert not Path(f"{backup}-wal").exists()

    # README "Backup and restore", steps 1 to 5.
    await running.stop()  # 1
    data_dir = running.service.settings.server.data_dir
    old = data_dir / "old"
    old.mkdir()
    for path in data_dir.glob("spool.sqlite3*"):  # 2
        shutil.move(path, old / path.name)
    shutil.copyfile(backup, data_dir / "spool.sqlite3")  # 3
    checked = await run(config, "db", "check")  # 4
    assert checked.exit_code == 0 and checked.stdout.strip() == "ok", checked.output
    dns.remove("example.test")
    dns.add_mx("example.test", "mx.example.test")
    restored: Running = await start(delivery={"retry_schedule": ["1h"]})  # 5
    retried = await run(config, "queue", "retry", "--all")
    assert retried.exit_code == 0, retried.output

    async def all_delivered() -> bool:
        messages = await restored.spool.list_messages(limit=1000)
        return len(messages) == info["messages"] and all(
            m.status is MessageStatus.DELIVERED for m in messages
        )

    await wait_until(all_delivered, timeout=20, message="restored mail not delivered")
    assert len(mx_sink.messages) == info["messages"]


async def test_backup_and_check_fail_clearly(tmp_path: Path, postroom: Running):
    config = cli_config(tmp_path, postroom)
    missing = await run(config, "db", "backup", str(tmp_path / "no" / "dir" / "b.sqlite3"))
    assert missing.exit_code == 1 and "backup failed: cannot write" in missing.output
    await postroom.stop()
    spool = postroom.service.settings.spool_path
    for path in spool.parent.glob("spool.sqlite3-*"):
        path.unlink()
    spool.write_bytes(b"not a database" * 100)
    damaged = await run(config, "db", "check")
    assert damaged.exit_code == 1 and "cannot check" in damaged.output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_spool_backup_and_tls_key_are_for_their_owner_only(tmp_path: Path):
    # The spool holds DKIM private keys (in the clear without encryption at rest).
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "postroom.toml", {"server": {"data_dir": str(data_dir)}})
    key = data_dir / "tls" / "key.pem"
    key.parent.mkdir(parents=True)
    key.write_text("left from an earlier attempt")
    key.chmod(0o644)
    postroom_cli(config, "init")
    assert mode(key) == 0o600
    postroom_cli(config, "domains", "add", "acme.test")
    spool = data_dir / "spool.sqlite3"
    assert mode(spool) == 0o600
    with sqlite3.connect(spool) as conn:  # while it is open, SQLite has its -wal and -shm
        conn.execute("SELECT count(*) FROM domains").fetchone()
        sidecars = sorted(data_dir.glob("spool.sqlite3-*"))
        assert [p.name for p in sidecars] == ["spool.sqlite3-shm", "spool.sqlite3-wal"]
        assert all(mode(p) == 0o600 for p in sidecars)
    backup = tmp_path / "spool-backup.sqlite3"
    postroom_cli(config, "db", "backup", str(backup))
    assert mode(backup) == 0o600
