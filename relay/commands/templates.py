"""`postroom templates`: push (create or replace), list and show message templates."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import click
from pydantic import ValidationError

from api.errors import ValidationFailed as ApiValidationFailed
from api.models import TemplateIn, TemplateOut
from relay.commands.context import emit, fail, settings_of, with_spool
from store import NotFound, Spool, Template


@click.group()
def templates() -> None:
    """Message templates (Jinja2: subject, html, text)."""


@templates.command("push")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_push(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Create or replace a template from a TOML or JSON file with name, subject, html, text."""
    from api.templates import check_template

    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"{path}: cannot read: {exc}")
    try:
        wanted = TemplateIn.model_validate(data)
        check_template(wanted)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: "
                       f"{str(e['msg']).removeprefix('Value error, ')}" for e in exc.errors()))
    except ApiValidationFailed as exc:
        fail("; ".join(f"{d.field}: {d.message}" for d in exc.details))
    settings = settings_of(ctx)

    async def work(spool: Spool) -> tuple[Template, bool]:
        try:
            await spool.get_template(wanted.name)
        except NotFound:
            created = await spool.create_template(
                wanted.name, wanted.subject, wanted.html, wanted.text
            )
            return created, True
        replaced = await spool.update_template(
            wanted.name, wanted.name, wanted.subject, wanted.html, wanted.text
        )
        return replaced, False

    template, created = with_spool(settings, work)
    data_out = TemplateOut.of(template).model_dump()
    emit(data_out, as_json, lambda: click.echo(
        f"{'created' if created else 'replaced'} {template.name} ({template.id})"
    ))


@templates.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_list(ctx: click.Context, as_json: bool) -> None:
    """List templates."""
    settings = settings_of(ctx)
    found = with_spool(settings, lambda spool: spool.list_templates())
    data = [TemplateOut.of(t).model_dump() for t in found]

    def human() -> None:
        for row in data:
            click.echo(f"{row['id']}  {row['name']}  {row['subject']!r}  {row['updated_at']}")

    emit(data, as_json, human)


@templates.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def templates_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show a template by id or name."""
    settings = settings_of(ctx)
    template = with_spool(settings, lambda spool: spool.get_template(ref))
    data = TemplateOut.of(template).model_dump()

    def human() -> None:
        click.echo(f"{template.id}  {template.name}\nsubject: {template.subject}")
        for part in ("text", "html"):
            if data[part] is not None:
                click.echo(f"--- {part}\n{data[part]}")

    emit(data, as_json, human)
