"""Spool methods for sending: domains and DKIM keys, suppressions, unsubscribe, templates."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence

from store import suppressions, templates
from store.crypto import DKIM
from store.errors import Conflict, KeyMismatch, NotFound, StoreError, UnreadableKeys
from store.records import DomainKeys, NewSuppression, Suppression, SuppressionFilter, Template
from store.spool_base import SpoolBase
from store.sql import Q


class SpoolSending(SpoolBase):
    """Sending domains with their keys, the suppression list, unsubscribe, templates."""

    # -- delivery: DKIM domains and suppressions ------------------------------------------------

    async def add_domain(self, keys: DomainKeys) -> None:
        """Store a sending domain with its DKIM keys; Conflict if it exists."""
        sealer = self._limits.sealer

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(Q["domain_exists"], {"name": keys.name}).fetchone() is not None:
                raise Conflict(f"domain {keys.name} already exists")
            conn.execute(
                Q["insert_domain"],
                {
                    "name": keys.name,
                    "selector": keys.selector,
                    "rsa_key": sealer.seal(keys.rsa_key, DKIM),
                    "ed25519_key": (
                        None if keys.ed25519_key is None else sealer.seal(keys.ed25519_key, DKIM)
                    ),
                    "now": keys.created_at,
                },
            )
            if keys.default_sender_name is not None:
                conn.execute(
                    Q["set_domain_sender_name"],
                    {"name": keys.name, "sender_name": keys.default_sender_name},
                )

        await self._writer.run(job)
        self._recent_names.drop()

    async def domain_keys(self, name: str) -> DomainKeys | None:
        """The DKIM keys of a sending domain, or None when it has none."""
        async with self._read() as conn:
            async with conn.execute(Q["domain_keys"], {"name": name.lower()}) as cur:
                row = await cur.fetchone()
        if row is None:
            return None
        return self._open_keys(DomainKeys.from_row(row))

    def _open_keys(self, keys: DomainKeys) -> DomainKeys:
        """The domain's keys with the private keys decrypted (store/crypto.py).

        The key check at open proved the configured key right, so a key that does not open is
        this one row's damage: UnreadableKeys names the domain and selector, never the key.
        """
        sealer = self._limits.sealer
        try:
            return dataclasses.replace(
                keys,
                rsa_key=sealer.open(keys.rsa_key, DKIM),
                ed25519_key=(
                    None if keys.ed25519_key is None else sealer.open(keys.ed25519_key, DKIM)
                ),
            )
        except KeyMismatch as exc:
            raise UnreadableKeys(keys.name, keys.selector, str(exc)) from None

    async def suppression(self, email: str) -> Suppression | None:
        """The address's live entry; None when it has none or its entry expired (unswept)."""
        params = {"email": email.lower(), "now": time.time()}
        async with self._read() as conn:
            async with conn.execute(Q["suppression_by_email"], params) as cur:
                row = await cur.fetchone()
        return None if row is None else Suppression.from_row(row)

    # -- sending: domains, suppressions, templates, unsubscribe ---------------------------------

    async def list_domains(self) -> list[DomainKeys]:
        """Every sending domain with its keys; UnreadableKeys when one's keys do not decrypt
        (`inspect_domains` shows the others and marks that one)."""
        found = []
        for keys, damage in await self.inspect_domains():
            if damage is not None:
                raise damage
            found.append(keys)
        return found

    async def inspect_domains(self) -> list[tuple[DomainKeys, UnreadableKeys | None]]:
        """Every sending domain, each with its keys opened, or with its damage.

        The DNS records of a domain are derived from its private keys (no public key is stored),
        so listing decrypts them. A row that does not decrypt comes with its UnreadableKeys and
        its keys emptied (`rsa_key` b"", `ed25519_key` b"" when it had one, so the algorithm
        still shows): one damaged row is shown as damaged instead of failing the whole list.
        """
        async with self._read() as conn, conn.execute(Q["list_domains"]) as cur:
            rows = await cur.fetchall()
        return [self._inspect_keys(DomainKeys.from_row(row)) for row in rows]

    async def inspect_domain(self, name: str) -> tuple[DomainKeys, UnreadableKeys | None]:
        """One sending domain as `inspect_domains` gives it; NotFound when it was never added."""
        async with self._read() as conn:
            async with conn.execute(Q["domain_keys"], {"name": name.lower()}) as cur:
                row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no sending domain {name.lower()}")
        return self._inspect_keys(DomainKeys.from_row(row))

    def _inspect_keys(self, sealed: DomainKeys) -> tuple[DomainKeys, UnreadableKeys | None]:
        try:
            return self._open_keys(sealed), None
        except UnreadableKeys as exc:
            emptied = dataclasses.replace(
                sealed, rsa_key=b"", ed25519_key=None if sealed.ed25519_key is None else b""
            )
            return emptied, exc

    async def get_domain(self, name: str) -> DomainKeys:
        """A sending domain; NotFound when it was never added, UnreadableKeys when its keys do
        not decrypt."""
        keys = await self.domain_keys(name)
        if keys is None:
            raise NotFound(f"no sending domain {name.lower()}")
        return keys

    async def remove_domain(self, name: str) -> None:
        """Remove a sending domain and its keys; its mail is no longer signed (nor, by default,
        accepted)."""

        def job(conn: sqlite3.Connection) -> None:
            if conn.execute(Q["delete_domain"], {"name": name.lower()}).rowcount == 0:
                raise NotFound(f"no sending domain {name.lower()}")

        await self._writer.run(job)
        self._recent_names.drop()

    async def set_default_sender_name(self, name: str, sender_name: str | None) -> None:
        def job(conn: sqlite3.Connection) -> None:
            params = {"name": name.lower(), "sender_name": sender_name}
            if conn.execute(Q["set_domain_sender_name"], params).rowcount == 0:
                raise NotFound(f"no sending domain {name.lower()}")

        await self._writer.run(job)
        self._recent_names.drop()

    async def default_sender_names(self, domains: Iterable[str]) -> dict[str, str]:
        """The default sender names of those of `domains` that have one."""
        recent = self._recent_names
        found: dict[str, str] = {}
        unknown = []
        for domain in {d.lower() for d in domains}:
            kept, name = recent.get(domain)
            if not kept:
                unknown.append(domain)
            elif name is not None:
                found[domain] = name
        if unknown:
            generation = recent.generation
            names = json.dumps(sorted(unknown))
            rows = await self._point_read(Q["sender_names_among"], {"names": names})
            read = {row[0]: row[1] for row in rows}
            for domain in unknown:
                recent.keep(domain, read.get(domain), generation)
            found.update(read)
        return found

    async def add_suppressions(self, entries: Sequence[NewSuppression]) -> list[bool]:
        """Suppress addresses; for each, whether it was new (False: already suppressed)."""
        applied = await self._writer.run(
            lambda conn: suppressions.add_job(conn, entries, time.time())
        )
        suppressions.log_changes(applied.changes)
        if applied.changes:
            self.notify_events()
        return list(applied.added)

    async def remove_suppression(self, email: str) -> None:
        """Take an address off the list (`suppression.deleted`); NotFound when it is not on it."""
        removed = await self._writer.run(
            lambda conn: suppressions.remove_job(conn, email, time.time())
        )
        suppressions.log_changes([removed])
        self.notify_events()

    async def get_suppression(self, email: str) -> Suppression:
        async with self._read() as conn:
            return await suppressions.get(conn, email, time.time())

    async def list_suppressions(
        self, where: SuppressionFilter, after: str = "", limit: int = 50
    ) -> list[Suppression]:
        """Live suppressions in address order, after the address `after`."""
        async with self._read() as conn:
            return await suppressions.list_page(conn, where, after, limit, time.time())

    async def unsubscribe(self, message_id: str, email: str) -> bool:
        """Record a one-click unsubscribe; whether the address was newly suppressed."""
        applied = await self._writer.run(
            lambda conn: suppressions.unsubscribe_job(conn, message_id, email, time.time())
        )
        suppressions.log_unsubscribed(applied, message_id)
        if applied.changes:
            self.notify_events()
        return applied.added[0]

    async def unsubscribe_secret(self) -> bytes:
        """The key of unsubscribe tokens, generated with the spool (migration 0005)."""
        if self._unsubscribe_secret is None:
            async with self._read() as conn:
                async with conn.execute(Q["spool_secret"], {"name": "unsubscribe"}) as cur:
                    row = await cur.fetchone()
            if row is None:
                raise StoreError("the spool has no unsubscribe secret")
            self._unsubscribe_secret = bytes(row[0])
        return self._unsubscribe_secret

    async def create_template(
        self, name: str, subject: str, html: str | None, text: str | None
    ) -> Template:
        """Store a template; Conflict when the name is taken."""
        return await self._writer.run(
            lambda conn: templates.create_job(conn, name, subject, html, text, time.time())
        )

    async def update_template(
        self, ref: str, name: str, subject: str, html: str | None, text: str | None
    ) -> Template:
        """Replace a template (by id or name); NotFound, or Conflict for a taken name."""
        return await self._writer.run(
            lambda conn: templates.update_job(conn, ref, name, subject, html, text, time.time())
        )

    async def delete_template(self, ref: str) -> None:
        await self._writer.run(lambda conn: templates.delete_job(conn, ref))

    async def get_template(self, ref: str) -> Template:
        """A template by id or name; NotFound when there is none."""
        async with self._read() as conn:
            return await templates.get(conn, ref)

    async def list_templates(self) -> list[Template]:
        async with self._read() as conn:
            return await templates.list_all(conn)
