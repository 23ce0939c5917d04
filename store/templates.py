"""Message templates in the spool: create, read, replace, delete (rendering is the API's)."""

from __future__ import annotations

import sqlite3

import aiosqlite

from store.errors import Conflict, NotFound
from store.ids import new_id
from store.records import Template
from store.sql import Q


def _by_ref(conn: sqlite3.Connection, ref: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(Q["template_by_ref"], {"ref": ref}).fetchone()
    return row


def create_job(
    conn: sqlite3.Connection, name: str, subject: str, html: str | None, text: str | None,
    now: float,
) -> Template:
    if _by_ref(conn, name) is not None:
        raise Conflict(f"a template named {name!r} exists")
    template = Template(new_id("tpl"), name, subject, html, text, now, now)
    conn.execute(
        Q["insert_template"],
        {"id": template.id, "name": name, "subject": subject, "html": html, "text": text,
         "now": now},
    )
    return template


def update_job(
    conn: sqlite3.Connection, ref: str, name: str, subject: str, html: str | None,
    text: str | None, now: float,
) -> Template:
    row = _by_ref(conn, ref)
    if row is None:
        raise NotFound(f"no template {ref}")
    other = _by_ref(conn, name)
    if other is not None and other["id"] != row["id"]:
        raise Conflict(f"a template named {name!r} exists")
    conn.execute(
        Q["update_template"],
        {"id": row["id"], "name": name, "subject": subject, "html": html, "text": text,
         "now": now},
    )
    return Template(row["id"], name, subject, html, text, row["created_at"], now)


def delete_job(conn: sqlite3.Connection, ref: str) -> None:
    if conn.execute(Q["delete_template"], {"ref": ref}).rowcount == 0:
        raise NotFound(f"no template {ref}")


async def get(conn: aiosqlite.Connection, ref: str) -> Template:
    async with conn.execute(Q["template_by_ref"], {"ref": ref}) as cur:
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"no template {ref}")
    return Template.from_row(row)


async def list_all(conn: aiosqlite.Connection) -> list[Template]:
    async with conn.execute(Q["list_templates"]) as cur:
        return [Template.from_row(row) for row in await cur.fetchall()]
