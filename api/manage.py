"""Managing messages: list them with filters and a cursor, cancel one, reschedule one.

Thin endpoints over the spool (scope `full`). The list cursor is opaque to clients: it encodes
the seq of the last message shown, so paging is a keyset walk that concurrent sends cannot
disturb (new messages land above the cursor, none is shown twice or skipped).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import time
from datetime import datetime

from pydantic import ValidationError
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.auth import authenticate
from api.body import MAX_OBJECT_BODY, read_json
from api.errors import ApiError, Conflict, Detail, ValidationFailed, from_validation_error
from api.events import parse_limit
from api.models import (
    MessageChangeOut,
    MessagePageOut,
    MessagePatch,
    MessageSummaryOut,
    refuse_unencodable,
)
from api.types import AppState
from store import (
    NEWEST,
    MessageChange,
    MessageQuery,
    RecipientStatus,
    Scope,
    UnitAction,
)

_CURSOR_PREFIX = "m1:"


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def decode_cursor(value: str) -> int:
    """The seq behind a cursor; 422 invalid_cursor for anything this server did not hand out."""
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        text = ""
    body = text.removeprefix(_CURSOR_PREFIX)
    if body == text or not body.isdigit() or not 0 < int(body) < NEWEST:
        raise ValidationFailed(
            "the cursor is not one this API returned",
            [Detail("cursor", "pass next_cursor from the previous page as it was")],
            slug="invalid_cursor",
        )
    return int(body)


def parse_time(query: QueryParams, name: str) -> float | None:
    """An ISO 8601 date-time query parameter (with a time zone) as UNIX time."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValidationFailed(
            details=[Detail(name, "an ISO 8601 date-time with a time zone, e.g. 2030-01-31T09:00Z")]
        )
    return parsed.timestamp()


def parse_query(query: QueryParams) -> MessageQuery:
    status = query.get("status") or None
    if status is not None and status not in {s.value for s in RecipientStatus}:
        raise ValidationFailed(details=[Detail("status", f"unknown recipient status {status!r}")])
    cursor = query.get("cursor")
    return MessageQuery(
        status=RecipientStatus(status) if status else None,
        recipient=query.get("recipient") or None,
        mail_from=query.get("from") or None,
        tag=query.get("tag") or None,
        created_after=parse_time(query, "created_after"),
        created_before=parse_time(query, "created_before"),
        before_seq=decode_cursor(cursor) if cursor else NEWEST,
        limit=parse_limit(query.get("limit")),
    )


async def list_messages(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    query = parse_query(request.query_params)
    # One more than asked tells whether another page follows, without a count.
    wanted = dataclasses.replace(query, limit=query.limit + 1)
    found = await state.spool.find_messages(wanted)
    page = found[: query.limit]
    more = len(found) > query.limit
    out = MessagePageOut(
        data=[MessageSummaryOut.of(m) for m in page],
        next_cursor=encode_cursor(page[-1].seq) if more else None,
    )
    return JSONResponse(out.to_json())


def _explain(change: MessageChange, verb: str, slug: str) -> ApiError:
    """409 when nothing could be changed, naming what each recipient is doing instead."""
    details = []
    for index, unit in enumerate(change.units):
        why = (
            "in flight: a delivery attempt is running; its outcome will be recorded"
            if unit.action is UnitAction.IN_FLIGHT
            else f"already {unit.status.value}"
        )
        details.append(Detail(f"recipients[{index}]", f"{unit.email}: {why}"))
    in_flight = any(u.action is UnitAction.IN_FLIGHT for u in change.units)
    return Conflict(
        f"nothing left to {verb}"
        + ("; a recipient in flight may still be delivered" if in_flight else ""),
        details,
        slug=slug,
    )


async def cancel_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    change = await state.spool.cancel_message(request.path_params["id"])
    if not change.changed:
        raise _explain(change, "cancel", "not_cancellable")
    return JSONResponse(MessageChangeOut.of(change).model_dump(mode="json"))


async def patch_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    body = await read_json(request, MAX_OBJECT_BODY)
    if not isinstance(body, dict):
        raise ValidationFailed("the request body must be a JSON object")
    refuse_unencodable(body)
    try:
        patch = MessagePatch.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    at = patch.scheduled_at.timestamp()
    if at <= time.time():
        raise ValidationFailed(details=[Detail("scheduled_at", "must be in the future")])
    change = await state.spool.reschedule_message(request.path_params["id"], at)
    if not change.changed:
        raise _explain(change, "reschedule", "not_reschedulable")
    return JSONResponse(MessageChangeOut.of(change).model_dump(mode="json"))


routes = [
    Route("/v1/messages", list_messages, methods=["GET"]),
    Route("/v1/messages/{id}", cancel_message, methods=["DELETE"]),
    Route("/v1/messages/{id}", patch_message, methods=["PATCH"]),
]
