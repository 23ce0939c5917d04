"""The one-click unsubscribe routes (RFC 8058), on the API listener and on `api.public_listen`.

`POST /unsubscribe/{token}` is the one click: the token is checked (store/unsubscribe.py), the
address it names is suppressed for marketing mail with reason `unsubscribe`, and an
`email.unsubscribed` event is recorded; repeating it changes nothing and answers 200 again.
`GET` shows a small page with a button that makes the same POST, because link scanners follow
GETs: a GET never unsubscribes. A forged or altered token is a 404 and suppresses nothing.
"""

from __future__ import annotations

import html

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from api.types import AppState
from store import read_token

_MAX_BODY = 4096  # the one-click body is `List-Unsubscribe=One-Click`
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto; padding: 0 1em">
<h1 style="font-size: 1.4em">{title}</h1>
{body}
</body></html>
"""


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=html.escape(title), body=body),
        status_code=status,
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


async def _recipient(request: Request) -> tuple[str, str] | None:
    state: AppState = request.app.state.postroom
    secret = await state.spool.unsubscribe_secret()
    return read_token(secret, request.path_params["token"])


async def confirm_page(request: Request) -> Response:
    found = await _recipient(request)
    if found is None:
        return _page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 404)
    _, address = found
    return _page(
        "Unsubscribe",
        f"<p>Stop marketing mail to <strong>{html.escape(address)}</strong>?</p>\n"
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">\n'
        '<button type="submit">Unsubscribe</button></form>',
    )


async def unsubscribe(request: Request) -> Response:
    found = await _recipient(request)
    if found is None:  # a browser posts the confirmation form: answer with a page too
        return _page("Link not valid", "<p>This unsubscribe link is not valid.</p>", 404)
    size = 0
    async for chunk in request.stream():  # read (and bound) the body; its content is not needed
        size += len(chunk)
        if size > _MAX_BODY:
            break
    message_id, address = found
    state: AppState = request.app.state.postroom
    await state.spool.unsubscribe(message_id, address)
    return _page(
        "Unsubscribed",
        f"<p><strong>{html.escape(address)}</strong> gets no more marketing mail from us.</p>",
    )


routes = [
    Route("/unsubscribe/{token}", confirm_page, methods=["GET"]),
    Route("/unsubscribe/{token}", unsubscribe, methods=["POST"]),
]
