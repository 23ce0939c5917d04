"""Webhook endpoint routes: create, list, show, change, delete, rotate the secret, test, the
attempt log, and replay. The dispatcher (through `AppState.webhooks`) checks URLs and sends tests.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.body import read_object
from api.errors import ApiError, Detail, ServiceUnavailable, ValidationFailed
from api.events import parse_cursor, parse_limit
from api.models import (
    AttemptOut,
    ReplayRequest,
    WebhookCreate,
    WebhookOut,
    WebhookPatch,
    WebhookSecretOut,
)
from api.types import AppState, WebhookGateway
from store import NewWebhook, Scope, WebhookChange

#: SQLite integers are signed 64-bit: a larger number would fail in the query, not here.
_MAX_INT = 2**63 - 1


def parse_id_param(value: str | None, field: str) -> int | None:
    """A non-negative integer query parameter no larger than SQLite stores, or None if absent."""
    if value is None or value == "":
        return None
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (value.isascii() and value.isdigit()) or int(value) > _MAX_INT:
        raise ValidationFailed(details=[Detail(field, f"an integer from 0 to {_MAX_INT}")])
    return int(value)


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    return state


def _gateway(state: AppState) -> WebhookGateway:
    if state.webhooks is None:
        raise ServiceUnavailable("webhooks are not running")
    return state.webhooks


async def _check_url(state: AppState, url: str) -> None:
    refusal = await _gateway(state).check_url(url)
    if refusal is not None:
        error = ApiError(refusal.message, [Detail("url", refusal.message)], slug=refusal.slug)
        error.status = 422
        raise error


def _with_secret(new: NewWebhook) -> dict[str, Any]:
    out = WebhookOut.of(new.endpoint).model_dump()
    return WebhookSecretOut(**out, secret=new.secret).model_dump()


async def create_webhook(request: Request) -> JSONResponse:
    state = await _state(request)
    create = await read_object(request, WebhookCreate)
    await _check_url(state, create.url)
    new = await state.spool.create_webhook(
        create.url, tuple(create.events), create.description, create.enabled
    )
    return JSONResponse(_with_secret(new), status_code=201)


async def list_webhooks(request: Request) -> JSONResponse:
    state = await _state(request)
    found = await state.spool.list_webhooks()
    return JSONResponse({"data": [WebhookOut.of(e).model_dump() for e in found]})


async def get_webhook(request: Request) -> JSONResponse:
    state = await _state(request)
    endpoint = await state.spool.get_webhook(request.path_params["id"])
    return JSONResponse(WebhookOut.of(endpoint).model_dump())


async def update_webhook(request: Request) -> JSONResponse:
    state = await _state(request)
    patch = await read_object(request, WebhookPatch)
    if patch.url is not None:
        await _check_url(state, patch.url)
    change = WebhookChange(
        url=patch.url,
        event_types=tuple(patch.events) if patch.events is not None else None,
        description=patch.description,
        is_enabled=patch.enabled,
    )
    endpoint = await state.spool.update_webhook(request.path_params["id"], change)
    return JSONResponse(WebhookOut.of(endpoint).model_dump())


async def delete_webhook(request: Request) -> Response:
    state = await _state(request)
    await state.spool.delete_webhook(request.path_params["id"])
    return Response(status_code=204)


async def rotate_secret(request: Request) -> JSONResponse:
    state = await _state(request)
    new = await state.spool.rotate_webhook_secret(request.path_params["id"])
    return JSONResponse(_with_secret(new))


async def test_webhook(request: Request) -> JSONResponse:
    state = await _state(request)
    endpoint = await state.spool.get_webhook(request.path_params["id"])
    result = await _gateway(state).send_test(endpoint)
    return JSONResponse(
        {
            "status_code": result.status_code,
            "success": result.is_success,
            "latency_ms": round(result.latency * 1000),
            "error": result.error,
        }
    )


async def list_deliveries(request: Request) -> JSONResponse:
    state = await _state(request)
    limit = parse_limit(request.query_params.get("limit"))
    before = parse_id_param(request.query_params.get("before"), "before")
    attempts = await state.spool.list_webhook_attempts(request.path_params["id"], before, limit)
    return JSONResponse(
        {
            "data": [AttemptOut.of(a).model_dump() for a in attempts],
            "next_before": attempts[-1].id if len(attempts) == limit else None,
        }
    )


async def replay(request: Request) -> JSONResponse:
    state = await _state(request)
    replay = await read_object(request, ReplayRequest)
    from_event = parse_cursor(replay.event_id, "event_id") or 0
    since = replay.since.timestamp() if replay.since else 0.0
    queued = await state.spool.replay_webhook(request.path_params["id"], from_event, since)
    return JSONResponse({"queued": queued}, status_code=202)


routes = [
    Route("/v1/webhooks", create_webhook, methods=["POST"]),
    Route("/v1/webhooks", list_webhooks, methods=["GET"]),
    Route("/v1/webhooks/{id}", get_webhook, methods=["GET"]),
    Route("/v1/webhooks/{id}", update_webhook, methods=["PATCH"]),
    Route("/v1/webhooks/{id}", delete_webhook, methods=["DELETE"]),
    Route("/v1/webhooks/{id}/rotate-secret", rotate_secret, methods=["POST"]),
    Route("/v1/webhooks/{id}/test", test_webhook, methods=["POST"]),
    Route("/v1/webhooks/{id}/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/webhooks/{id}/replay", replay, methods=["POST"]),
]
