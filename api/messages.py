"""Message endpoints: send one message, read one back."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from api.auth import authenticate
from api.compose import compose, envelope_sender
from api.errors import BadRequest, PayloadTooLarge, ValidationFailed, from_validation_error
from api.models import AcceptedOut, MessageOut, SendRequest
from api.types import AppState
from store import Scope, Source, Submission, format_time


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise BadRequest() from None


async def send_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    principal = await authenticate(request, state.spool, Scope.SEND)
    body = await read_json(request, state.settings.api.max_request_size)
    if not isinstance(body, dict):
        raise ValidationFailed("the request body must be a JSON object")
    try:
        send = SendRequest.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    content = compose(send, state.settings.server.hostname)
    submission = Submission(
        mail_from=envelope_sender(send),
        recipients=tuple(send.to),
        content=content,
        source=Source.API,
        principal=principal,
    )
    accepted = await state.spool.accept(submission)
    out = AcceptedOut(
        id=accepted.id, status=accepted.status.value, created_at=format_time(accepted.created_at)
    )
    return JSONResponse(out.model_dump(), status_code=202)


async def get_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, state.spool, Scope.FULL)
    message = await state.spool.get_message(request.path_params["id"])
    return JSONResponse(MessageOut.of(message).to_json())
