"""Suppression-list routes: list (filters, cursor pages), show, add (one or many), remove.

An unsubscribe blocks marketing mail only; hard bounces, complaints and manual entries block
every message (store/intake.py applies the list)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.body import read_object
from api.errors import Detail, NotFoundError, ValidationFailed
from api.events import parse_limit
from api.models import SuppressionCreate, SuppressionOut, normalise_address
from api.types import AppState
from store import NewSuppression, Scope, SuppressionFilter, SuppressionReason


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    return state


def _address(request: Request) -> str:
    value = request.path_params["address"]
    try:
        return normalise_address(value).lower()
    except ValueError:
        raise NotFoundError(f"{value} is not suppressed") from None


def parse_filter(params: dict[str, str]) -> SuppressionFilter:
    reason = params.get("reason") or None
    if reason is not None and reason not in {r.value for r in SuppressionReason}:
        raise ValidationFailed(
            details=[Detail("reason", "one of " + ", ".join(r.value for r in SuppressionReason))]
        )
    return SuppressionFilter(
        reason=SuppressionReason(reason) if reason else None,
        search=params.get("search") or None,
    )


async def list_suppressions(request: Request) -> JSONResponse:
    state = await _state(request)
    params = dict(request.query_params)
    where = parse_filter(params)
    limit = parse_limit(params.get("limit"))
    page = await state.spool.list_suppressions(where, params.get("after", ""), limit + 1)
    has_more = len(page) > limit
    page = page[:limit]
    return JSONResponse(
        {
            "data": [SuppressionOut.of(s).model_dump() for s in page],
            "next_cursor": page[-1].email if page else None,
            "has_more": has_more,
        }
    )


async def get_suppression(request: Request) -> JSONResponse:
    state = await _state(request)
    entry = await state.spool.get_suppression(_address(request))
    return JSONResponse(SuppressionOut.of(entry).model_dump())


async def add_suppressions(request: Request) -> JSONResponse:
    state = await _state(request)
    wanted = await read_object(request, SuppressionCreate)
    addresses = wanted.addresses
    expires = wanted.expires_at.timestamp() if wanted.expires_at else None
    added = await state.spool.add_suppressions(
        [
            NewSuppression(a, SuppressionReason(wanted.reason), expires, wanted.message_id)
            for a in addresses
        ]
    )
    return JSONResponse(
        {
            "added": [a for a, new in zip(addresses, added, strict=True) if new],
            "already_suppressed": [a for a, new in zip(addresses, added, strict=True) if not new],
        },
        status_code=201 if any(added) else 200,
    )


async def remove_suppression(request: Request) -> Response:
    state = await _state(request)
    await state.spool.remove_suppression(_address(request))
    return Response(status_code=204)


routes = [
    Route("/v1/suppressions", list_suppressions, methods=["GET"]),
    Route("/v1/suppressions", add_suppressions, methods=["POST"]),
    Route("/v1/suppressions/{address}", get_suppression, methods=["GET"]),
    Route("/v1/suppressions/{address}", remove_suppression, methods=["DELETE"]),
]
