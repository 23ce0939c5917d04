"""The API's errors and the one place that renders them.

    ApiError(status, slug)           every error a client sees
    ├── BadRequest         400 bad_request
    ├── Unauthorized       401 unauthorized
    ├── Forbidden          403 forbidden / sender_not_allowed
    ├── NotFoundError      404 not_found
    ├── Conflict           409 conflict / idempotency_key_reused / idempotency_key_in_progress
    ├── PayloadTooLarge    413 payload_too_large
    ├── ClientClosedRequest 499 client_closed_request (the client hung up: nobody reads it)
    ├── ValidationFailed   422 validation_error (details name each field by path)
    │   ├── InvalidRecipient 422 invalid_recipient (the domain cannot receive mail)
    │   └── TemplateRenderError 422 template_render_error (names the variable or the fault)
    ├── TooManyRequests    429 too_many_requests (with Retry-After)
    ├── KeyDamaged         500 dkim_key_damaged (a domain's stored DKIM key does not decrypt:
    │                      retrying does not help; the message says how to replace it)
    ├── ServiceUnavailable 503 service_unavailable
    └── InsufficientStorage 507 insufficient_storage

Every error body is `{"error": slug, "message": text, "details": [{"field", "message"}]}`.
Store errors are translated here; anything unexpected is a 500 `internal_error` whose traceback
goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from store import Conflict as StoreConflict
from store import (
    IdempotencyConflict,
    NotFound,
    PolicyRejected,
    SpoolClosed,
    StorageFull,
    StoreError,
    UnreadableKeys,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Detail:
    field: str
    message: str


class ApiError(Exception):
    """The request failed."""

    status = 500
    slug = "internal_error"

    def __init__(
        self,
        message: str | None = None,
        details: Sequence[Detail] = (),
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        self.details = list(details)
        self.headers = headers or {}
        if slug:
            self.slug = slug


class BadRequest(ApiError):
    """The request body is not valid JSON."""

    status, slug = 400, "bad_request"


class Unauthorized(ApiError):
    """A valid API key is required: send `Authorization: Bearer <key>`."""

    status, slug = 401, "unauthorized"


class Forbidden(ApiError):
    """This API key may not do that."""

    status, slug = 403, "forbidden"


class NotFoundError(ApiError):
    """No such resource."""

    status, slug = 404, "not_found"


class Conflict(ApiError):
    """The request conflicts with an earlier one."""

    status, slug = 409, "conflict"


class MethodNotAllowed(ApiError):
    """This method is not allowed on this resource."""

    status, slug = 405, "method_not_allowed"


class PayloadTooLarge(ApiError):
    """The request body is too large."""

    status, slug = 413, "payload_too_large"


class ClientClosedRequest(ApiError):
    """The client disconnected before its request was read whole."""

    status, slug = 499, "client_closed_request"


class ValidationFailed(ApiError):
    """The request is not valid."""

    status, slug = 422, "validation_error"


class InvalidRecipient(ValidationFailed):
    """A recipient's domain cannot receive mail."""

    slug = "invalid_recipient"


class TooManyRequests(ApiError):
    """Too many requests; wait for the number of seconds in Retry-After."""

    status, slug = 429, "too_many_requests"
class TemplateRenderError(ValidationFailed):
    """The template could not be rendered with these variables."""

    slug = "template_render_error"


class KeyDamaged(ApiError):
    """A sending domain's stored DKIM key is damaged."""

    status, slug = 500, "dkim_key_damaged"


def damaged_key_message(exc: UnreadableKeys) -> str:
    """What is wrong with a domain's keys and what the operator does about it."""
    return (
        f"{exc}; the stored key is damaged and retrying will not help: replace it with "
        f"`postroom domains remove {exc.domain}` then `postroom domains add {exc.domain}`, "
        "and publish the new DNS records"
    )


class ServiceUnavailable(ApiError):
    """Postroom is shutting down or not ready; try again later."""

    status, slug = 503, "service_unavailable"


class InsufficientStorage(ApiError):
    """The spool's storage is full; try again later."""

    status, slug = 507, "insufficient_storage"


def from_validation_error(exc: ValidationError) -> ValidationFailed:
    """pydantic's errors as details naming each field by path: `to[1]`, `attachments[0].x`."""
    details = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            if part == "[key]":  # a bad dict key: the path already names it
                continue
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += ("." if path else "") + str(part)
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        details.append(Detail(field=path or "body", message=message))
    return ValidationFailed(details=details)


def from_store_error(exc: StoreError) -> ApiError:
    if isinstance(exc, PolicyRejected):
        details = [Detail(exc.field, str(exc))] if exc.field else []
        error = ApiError(str(exc), details, slug=exc.slug)
        error.status = _POLICY_STATUS.get(exc.slug, 422)
        return error
    if isinstance(exc, IdempotencyConflict):
        return Conflict(str(exc), slug=exc.slug)
    if isinstance(exc, NotFound):
        return NotFoundError(str(exc))
    if isinstance(exc, StoreConflict):
        return Conflict(str(exc))
    if isinstance(exc, StorageFull):
        return InsufficientStorage()
    if isinstance(exc, SpoolClosed):
        return ServiceUnavailable()
    if isinstance(exc, UnreadableKeys):
        return KeyDamaged(damaged_key_message(exc))
    return ServiceUnavailable("the spool could not complete the request; try again later")


_POLICY_STATUS = {"message_too_large": 413, "sender_not_allowed": 403}


def body_of(error: ApiError) -> dict[str, object]:
    """The error body: alone in a response, or as one item's result in a batch."""
    return {
        "error": error.slug,
        "message": str(error),
        "details": [{"field": d.field, "message": d.message} for d in error.details],
    }


def render(error: ApiError) -> JSONResponse:
    return JSONResponse(body_of(error), status_code=error.status, headers=error.headers)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return render(exc)


async def handle_store_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StoreError)
    return render(from_store_error(exc))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return render(NotFoundError())
    if exc.status_code == 405:
        return render(MethodNotAllowed())
    if exc.status_code == 413:
        return render(PayloadTooLarge())
    error = ApiError(str(exc.detail), slug="http_error")
    error.status = exc.status_code
    return render(error)


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """A client that hung up mid-request is no error of ours: one log line, no traceback.

    Nothing was stored (the body was never read whole); the answer goes nowhere.
    """
    logger.info("client disconnected during %s %s", request.method, request.url.path)
    return render(ClientClosedRequest())


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return render(ApiError("internal error; it has been logged"))
