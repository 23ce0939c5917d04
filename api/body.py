"""Reading request bodies: the one place that turns a request's bytes into JSON or a model.

Owns the size limit (refused before the body is read whole), malformed JSON (`400
bad_request`), the JSON-object check, unencodable text (`422` naming its path) and pydantic's
errors (`422 validation_error`). The send routes read JSON and validate item by item; every
other route that takes a JSON object reads it with `read_object`.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from api.errors import BadRequest, PayloadTooLarge, ValidationFailed, from_validation_error
from api.models import refuse_unencodable

M = TypeVar("M", bound=BaseModel)

#: The largest body of a managing route (webhooks, templates, domains, suppressions, PATCH).
MAX_OBJECT_BODY = 64 * 1024


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
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest() from None


async def read_object(request: Request, model: type[M], limit: int = MAX_OBJECT_BODY) -> M:
    """A JSON object body as `model`. A lone surrogate anywhere in it is a 422 naming its path."""
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise ValidationFailed("the request body must be a JSON object")
    refuse_unencodable(body)
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
