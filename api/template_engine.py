"""Pure template rendering: Jinja2's sandbox, HTML autoescaped, a missing variable an error.

Owns turning a stored `Template` and the request's variables into the subject, html and text
that composition then treats like any other request's. The sandbox keeps templates from reaching
Python internals; `StrictUndefined` makes a missing variable fail the request (naming it) rather
than send a half-rendered message. The subject and text are not escaped; the html is. Compiled
templates are cached by their source. Jinja2's exceptions stay in this module.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from store import Template

_PLAIN = SandboxedEnvironment(
    autoescape=False, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)
_HTML = SandboxedEnvironment(
    autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
)
_UNDEFINED = re.compile(r"^'([^']+)' is undefined$")


class RenderError(Exception):
    """A template part could not be compiled or rendered; `field` names the part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    html: str | None
    text: str | None


@functools.lru_cache(maxsize=512)
def _compile(source: str, is_html: bool) -> jinja2.Template:
    return (_HTML if is_html else _PLAIN).from_string(source)


def check_syntax(subject: str, html: str | None, text: str | None) -> list[RenderError]:
    """The parts that do not compile (for push and create): empty when all do."""
    problems = []
    for field, source, is_html in (
        ("subject", subject, False), ("html", html, True), ("text", text, False)
    ):
        if source is None:
            continue
        try:
            _compile(source, is_html)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(RenderError(field, f"line {exc.lineno}: {exc.message}"))
    return problems


def _render(field: str, source: str, is_html: bool, variables: Mapping[str, object]) -> str:
    try:
        return _compile(source, is_html).render(dict(variables))
    except jinja2.UndefinedError as exc:
        text = str(exc.message or exc)
        if m := _UNDEFINED.match(text):
            raise RenderError(field, f"the variable {m.group(1)!r} is missing") from None
        raise RenderError(field, f"a variable is missing: {text}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise RenderError(field, f"not allowed in a template: {exc}") from None
    except jinja2.TemplateError as exc:
        raise RenderError(field, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a division by zero inside the template
        raise RenderError(field, f"{exc.__class__.__name__}: {exc}") from None


def render(template: Template, variables: Mapping[str, object]) -> Rendered:
    """All parts rendered, or RenderError for the first that fails (nothing half-rendered)."""
    subject = _render("subject", template.subject, False, variables).strip()
    if "\r" in subject or "\n" in subject:
        raise RenderError("subject", "the rendered subject contains a line break")
    html = None if template.html is None else _render("html", template.html, True, variables)
    text = None if template.text is None else _render("text", template.text, False, variables)
    return Rendered(subject, html, text)
