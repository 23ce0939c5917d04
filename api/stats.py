"""`GET /v1/stats`: delivery figures for the messages accepted in a window (scope `full`)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.auth import authenticate
from api.errors import Detail, ValidationFailed
from api.manage import parse_time
from api.models import StatsOut
from api.types import AppState
from store import Scope, StatsGrouping

#: Without `since`, the window is the last seven days.
DEFAULT_WINDOW = 7 * 86400.0


async def get_stats(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    query = request.query_params
    until = parse_time(query, "until")
    until = time.time() if until is None else until  # the epoch itself is a valid bound
    since = parse_time(query, "since")
    since = until - DEFAULT_WINDOW if since is None else since
    if since >= until:
        raise ValidationFailed(details=[Detail("since", "must be before until")])
    grouping = query.get("group_by") or None
    if grouping is not None and grouping not in {g.value for g in StatsGrouping}:
        raise ValidationFailed(details=[Detail("group_by", "one of day, domain, tag")])
    group_by = StatsGrouping(grouping) if grouping else None
    groups = await state.spool.stats(since, until, group_by)
    return JSONResponse(StatsOut.of(since, until, group_by, groups).model_dump(mode="json"))


routes = [Route("/v1/stats", get_stats, methods=["GET"])]
