"""Bearer authentication: an `Authorization: Bearer <key>` header → the calling `Principal`.

Also where the rate limits are applied, because only here is the caller known: a client address
with too many failed authentications is refused before any key lookup, and a key with a limit
spends a token per request (its headers go on the answer, whatever it is).

The lookup and the limits are one step (`check_key`), answered by the process that owns the
spool and the buckets: this one, or, when the API runs in worker processes, the service (through
`AppState.link`), so that a key's limit is one limit however many processes serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from api.errors import Forbidden, TooManyRequests, Unauthorized
from api.ratelimit import SCOPE_KEY, Decision
from api.types import AppState
from store import Principal, Scope, pickled_by_fields


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class KeyCheck:
    """What the key lookup and the limits decided for one request."""

    principal: Principal | None = None  # None: no such key, or it is revoked
    #: Seconds until the client address may try again, when it failed too often (no lookup)
    locked_for: int | None = None
    #: The key's rate limit, when it has one: the token spent, or refused
    decision: Decision | None = None
    per_minute: int = 0

    @property
    def admits(self) -> bool:
        """Whether the request may go on (a key found, not over its limit)."""
        return self.principal is not None and (self.decision is None or self.decision.allowed)


async def check_key(state: AppState, client: str, secret: str) -> KeyCheck:
    """Look `secret` up for `client`, against the failed-authentication and per-key limits."""
    limits = state.limits
    if limits is not None:
        gate = limits.auth_allowed(client)
        if not gate.allowed:
            return KeyCheck(locked_for=gate.retry_after)
    principal = await state.spool.authenticate(secret)
    if principal is None:
        if limits is not None:
            limits.auth_failed(client)
        return KeyCheck()
    per_minute = (
        principal.rate_limit
        if principal.rate_limit is not None
        else state.settings.api.rate_limit_per_minute
    )
    decision = None
    if limits is not None and per_minute > 0:
        decision = limits.take(principal.key_id, per_minute)
    return KeyCheck(principal, decision=decision, per_minute=per_minute)


async def authenticate(request: Request, scope: Scope = Scope.SEND) -> Principal:
    """The principal behind the request's key; 401 without a valid key, 403 without `scope`,
    429 over a rate limit."""
    client, secret = bearer(request)
    state: AppState = request.app.state.postroom
    link = state.link
    if link is not None:
        check = await link.check_key(client, secret)
    else:
        check = await check_key(state, client, secret)
    return admit(request, check, scope)


def bearer(request: Request) -> tuple[str, str]:
    """The client's address and the request's Bearer secret; 401 without one."""
    header = request.headers.get("authorization", "")
    kind, _, secret = header.partition(" ")
    if kind.lower() != "bearer" or not secret.strip():
        raise Unauthorized()
    return (request.client.host if request.client else ""), secret.strip()


def admit(request: Request, check: KeyCheck, scope: Scope) -> Principal:
    """The principal `check` found, its rate-limit headers set on the answer; the error that
    refuses the request otherwise (429 locked out, 401, 429 over the key's limit, 403)."""
    if check.locked_for is not None:
        raise TooManyRequests(
            "too many failed authentications from this address; wait and retry",
            headers={"Retry-After": str(check.locked_for)},
        )
    principal = check.principal
    if principal is None:
        raise Unauthorized("the API key is invalid or revoked")
    decision = check.decision
    if decision is not None:
        request.scope[SCOPE_KEY] = decision.headers()
        if not decision.allowed:
            raise TooManyRequests(
                f"this API key may make {check.per_minute} requests a minute",
                headers={"Retry-After": str(decision.retry_after)},
            )
    if scope is Scope.FULL and principal.scope is not Scope.FULL:
        raise Forbidden("this API key has the send scope only")
    return principal
