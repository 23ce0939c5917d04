"""Bearer authentication: an `Authorization: Bearer <key>` header → the calling `Principal`."""

from __future__ import annotations

from starlette.requests import Request

from api.errors import Forbidden, Unauthorized
from store import Principal, Scope, Spool


async def authenticate(request: Request, spool: Spool, scope: Scope = Scope.SEND) -> Principal:
    """The principal behind the request's key; 401 without a valid key, 403 without `scope`."""
    header = request.headers.get("authorization", "")
    kind, _, secret = header.partition(" ")
    if kind.lower() != "bearer" or not secret.strip():
        raise Unauthorized()
    principal = await spool.authenticate(secret.strip())
    if principal is None:
        raise Unauthorized("the API key is invalid or revoked")
    if scope is Scope.FULL and principal.scope is not Scope.FULL:
        raise Forbidden("this API key has the send scope only")
    return principal
