"""What every `postroom` command shares: loading the settings, opening the spool, output, failure.

Every command loads the settings the same way (`--config`, else `POSTROOM_CONFIG`, else
`./postroom.toml`, else `/etc/postroom/postroom.toml`), and a bad config exits 2 with
`section.key: reason`, never a traceback. Output is human text, or JSON with `--json` (`emit`);
an error is one `postroom: …` line on stderr and exit 1 (`fail`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click

from config import ConfigError, Settings, load_settings
from store import Conflict, NotFound, Spool, StoreError, migrate

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"postroom: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context, *, must_exist: bool | None = None) -> Settings:
    try:
        settings: Settings = load_settings(ctx.obj["config"], must_exist=must_exist)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"postroom: config: {problem}", err=True)
        sys.exit(2)
    return settings


def with_spool(settings: Settings, work: Callable[[Spool], Awaitable[T]]) -> T:
    """Open the spool, run `work`, close it; store errors become a clear message and exit 1."""
    if not settings.spool_path.exists():
        fail(f"no spool at {settings.spool_path}: run `postroom init` first")

    async def run() -> T:
        spool = await Spool.open(settings, readers=1)
        try:
            return await work(spool)
        finally:
            await spool.close()

    try:
        return asyncio.run(run())
    except (NotFound, Conflict) as exc:
        fail(str(exc))
    except StoreError as exc:
        fail(f"spool: {exc}")


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


def migrate_spool(settings: Settings) -> list[str]:
    """Create or upgrade the spool; a spool that cannot be opened is a message and exit 1."""
    try:
        return migrate(settings.spool_path, settings.storage.busy_timeout)
    except StoreError as exc:
        fail(str(exc))


def progress(label: str, length: int, hidden: bool) -> Any:
    """A progress bar on stderr (click prints only the label when stderr is not a terminal)."""
    return click.progressbar(length=max(length, 1), label=label, file=sys.stderr, hidden=hidden)
