"""Bearer authentication: an `Authorization: Bearer <key>` header → the calling `Principal`.

Also where the rate limits are applied, because only here is the caller known: a client address
with too many failed authentications is refused before any key lookup, and a key with a limit
spends a token per request (its headers go on the answer, whatever it is).
"""

from __future__ import annotations

from starlette.requests import Request

from api.errors import Forbidden, TooManyRequests, Unauthorized
from api.ratelimit import SCOPE_KEY
from api.types import AppState
from store import Principal, Scope, Spool


async def authenticate(request: Request, spool: Spool, scope: Scope = Scope.SEND) -> Principal:
    """The principal behind the request's key; 401 without a valid key, 403 without `scope`,
    429 over a rate limit."""
    header = request.headers.get("authorization", "")
    kind, _, secret = header.partition(" ")
    if kind.lower() != "bearer" or not secret.strip():
        raise Unauthorized()
    state: AppState = request.app.state.postroom
    limits = state.limits
    client = request.client.host if request.client else ""
    if limits is not None:
        gate = limits.auth_allowed(client)
        if not gate.allowed:
            raise TooManyRequests(
                "too many failed authentications from this address; wait and retry",
                headers={"Retry-After": str(gate.retry_after)},
            )
    principal = await spool.authenticate(secret.strip())
    if principal is None:
        if limits is not None:
            limits.auth_failed(client)
        raise Unauthorized("the API key is invalid or revoked")
    per_minute = (
        principal.rate_limit
        if principal.rate_limit is not None
        else state.settings.api.rate_limit_per_minute
    )
    if limits is not None and per_minute > 0:
        decision = limits.take(principal.key_id, per_minute)
        request.scope[SCOPE_KEY] = decision.headers()
        if not decision.allowed:
            raise TooManyRequests(
                f"this API key may make {per_minute} requests a minute",
                headers={"Retry-After": str(decision.retry_after)},
            )
    if scope is Scope.FULL and principal.scope is not Scope.FULL:
        raise Forbidden("this API key has the send scope only")
    return principal
