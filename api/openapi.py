"""`GET /openapi.json`: the published contract, OpenAPI 3.1, built from the pydantic models.

Owns the list of operations — every route with its scope, parameters, request body, answer and
the errors it may give — and turns it into one document whose schemas are the models' own JSON
Schemas (JSON Schema 2020-12, which OpenAPI 3.1 uses as is). A test holds this list equal to the
route table, so a new route cannot go unpublished.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse

from api import models as m
from store import EventType, RecipientStatus, StatsGrouping, SuppressionReason

_REF = "#/components/schemas/{model}"
_MESSAGE_STATUSES = [s.value for s in RecipientStatus]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    schema: dict[str, Any]
    where: str = "query"
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: what the route takes and what it may answer."""

    method: str
    path: str
    summary: str
    scope: str | None  # "send" / "full"; None: no key
    ok: int = 200
    response: type[BaseModel] | None = None
    media: str = "application/json"  # of the success answer
    request: type[BaseModel] | None = None
    request_is_array: bool = False
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    extra_ok: tuple[int, ...] = field(default=())  # other success statuses with the same body
    #: A POST that only reads (DNS lookups): no 507. Every other non-GET route writes.
    is_read_only: bool = False

    @property
    def writes(self) -> bool:
        return self.method != "GET" and not self.is_read_only


def _string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


_LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50})
_EVENT_FILTERS = (
    Param("type", _string(enum=[e.value for e in EventType])),
    Param("message_id", _string()),
    Param("recipient", _string()),
    Param("after", _string(), description="an event id (evt_…): events after it"),
    _LIMIT,
)
_IDEMPOTENCY = Param(
    "Idempotency-Key", _string(minLength=1, maxLength=255), where="header",
    description="the same key and body replay the first answer (see README, Idempotency)",
)
_SEND = (400, 403, 409, 413, 422)
_ID = (404,)

OPERATIONS: tuple[Op, ...] = (
    Op("GET", "/healthz", "Liveness: answers while the process runs", None, response=m.HealthOut),
    Op("GET", "/readyz", "Readiness: 200 once serving, 503 while stopping", None,
       response=m.ReadyOut, extra_ok=(503,)),
    Op("GET", "/metrics", "Prometheus metrics", None, media="text/plain", errors=(404,)),
    Op("GET", "/openapi.json", "This document", None),
    Op("POST", "/v1/messages", "Send a message", "send", 202, m.AcceptedOut,
       request=m.SendRequest, params=(_IDEMPOTENCY,), errors=_SEND),
    Op("GET", "/v1/messages", "List messages, newest first", "full", response=m.MessagePageOut,
       params=(
           Param("status", _string(enum=_MESSAGE_STATUSES),
                 description="messages with a recipient in this status"),
           Param("recipient", _string()),
           Param("from", _string(), description="the envelope sender"),
           Param("tag", _string(), description="a tag name"),
           Param("created_after", _string(format="date-time")),
           Param("created_before", _string(format="date-time")),
           _LIMIT,
           Param("cursor", _string(), description="next_cursor of the previous page"),
       ),
       errors=(422,)),
    Op("POST", "/v1/messages/batch", "Send many messages", "send", 200, m.BatchOut,
       request=m.SendRequest, request_is_array=True, errors=_SEND, extra_ok=(207,)),
    Op("POST", "/v1/send", "Send a message (channel-tagged shape)", "send", 202,
       m.CompatAcceptedOut, request=m.CompatSendRequest, params=(_IDEMPOTENCY,), errors=_SEND),
    Op("POST", "/v1/send/batch", "Send many messages (channel-tagged shape)", "send", 200,
       m.BatchOut, request=m.CompatSendRequest, request_is_array=True, errors=_SEND,
       extra_ok=(207,)),
    Op("GET", "/v1/messages/{id}", "A message, its recipients and events", "full",
       response=m.MessageOut, errors=_ID),
    Op("DELETE", "/v1/messages/{id}", "Cancel what is not delivered and not in flight", "full",
       response=m.MessageChangeOut, errors=(*_ID, 409)),
    Op("PATCH", "/v1/messages/{id}", "Reschedule what has not been sent", "full",
       response=m.MessageChangeOut, request=m.MessagePatch, errors=(*_ID, 400, 409, 413, 422)),
    Op("GET", "/v1/events", "Events, oldest first", "full", response=m.EventPageOut,
       params=_EVENT_FILTERS, errors=(422,)),
    Op("GET", "/v1/events/stream", "Events as Server-Sent Events", "full",
       media="text/event-stream",
       params=(*_EVENT_FILTERS[:4], Param("Last-Event-ID", _string(), where="header")),
       errors=(422,)),
    Op("POST", "/v1/webhooks", "Add a webhook endpoint", "full", 201, m.WebhookSecretOut,
       request=m.WebhookCreate, errors=(400, 413, 422)),
    Op("GET", "/v1/webhooks", "Webhook endpoints", "full", response=m.WebhookListOut),
    Op("GET", "/v1/webhooks/{id}", "A webhook endpoint", "full", response=m.WebhookOut,
       errors=_ID),
    Op("PATCH", "/v1/webhooks/{id}", "Change a webhook endpoint", "full", response=m.WebhookOut,
       request=m.WebhookPatch, errors=(*_ID, 400, 413, 422)),
    Op("DELETE", "/v1/webhooks/{id}", "Remove a webhook endpoint", "full", 204, errors=_ID),
    Op("POST", "/v1/webhooks/{id}/rotate-secret", "Rotate the signing secret", "full",
       response=m.WebhookSecretOut, errors=_ID),
    Op("POST", "/v1/webhooks/{id}/test", "Send a webhook.test event now", "full",
       response=m.WebhookTestOut, errors=_ID),
    Op("GET", "/v1/webhooks/{id}/deliveries", "The endpoint's attempt log", "full",
       response=m.DeliveriesOut,
       params=(_LIMIT, Param("before", {"type": "integer", "minimum": 0})),
       errors=(*_ID, 422)),
    Op("POST", "/v1/webhooks/{id}/replay", "Queue events again", "full", 202, m.ReplayOut,
       request=m.ReplayRequest, errors=(*_ID, 400, 413, 422)),
    Op("GET", "/v1/stats", "Delivery figures over a window", "full", response=m.StatsOut,
       params=(
           Param("since", _string(format="date-time"), description="default: until - 7 days"),
           Param("until", _string(format="date-time"), description="default: now"),
           Param("group_by", _string(enum=[g.value for g in StatsGrouping])),
       ),
       errors=(422,)),
    Op("POST", "/v1/domains", "Add a sending domain with new DKIM keys", "full", 201,
       m.DomainOut, request=m.DomainCreate, errors=(400, 409, 413, 422)),
    Op("GET", "/v1/domains", "Sending domains and their DNS records", "full",
       response=m.DomainListOut),
    Op("GET", "/v1/domains/{name}", "A sending domain and its DNS records", "full",
       response=m.DomainOut, errors=_ID),
    Op("PATCH", "/v1/domains/{name}", "Change a domain's default sender name", "full",
       response=m.DomainOut, request=m.DomainPatch, errors=(*_ID, 400, 413, 422)),
    Op("DELETE", "/v1/domains/{name}", "Remove a sending domain and its keys", "full", 204,
       errors=_ID),
    Op("POST", "/v1/domains/{name}/verify", "Look the domain's records up in DNS now", "full",
       response=m.DomainVerifyOut, errors=_ID, is_read_only=True),
    Op("GET", "/v1/suppressions", "The suppression list, by address", "full",
       response=m.SuppressionPageOut,
       params=(
           Param("reason", _string(enum=[r.value for r in SuppressionReason])),
           Param("search", _string(), description="addresses containing this text"),
           _LIMIT,
           Param("after", _string(), description="next_cursor of the previous page"),
       ),
       errors=(422,)),
    Op("POST", "/v1/suppressions", "Suppress one address or several", "full", 201,
       m.SuppressionAddOut, request=m.SuppressionCreate, errors=(400, 413, 422),
       extra_ok=(200,)),
    Op("GET", "/v1/suppressions/{address}", "One suppressed address", "full",
       response=m.SuppressionOut, errors=_ID),
    Op("DELETE", "/v1/suppressions/{address}", "Take an address off the list", "full", 204,
       errors=_ID),
    Op("POST", "/v1/templates", "Store a template", "full", 201, m.TemplateOut,
       request=m.TemplateIn, errors=(400, 409, 413, 422)),
    Op("GET", "/v1/templates", "Stored templates", "full", response=m.TemplateListOut),
    Op("GET", "/v1/templates/{id}", "A template, by id or name", "full",
       response=m.TemplateOut, errors=_ID),
    Op("PUT", "/v1/templates/{id}", "Replace a template", "full", response=m.TemplateOut,
       request=m.TemplateIn, errors=(*_ID, 400, 409, 413, 422)),
    Op("DELETE", "/v1/templates/{id}", "Delete a template", "full", 204, errors=_ID),
    Op("GET", "/unsubscribe/{token}", "One-click unsubscribe: the confirmation page", None,
       media="text/html", errors=(404,)),
    Op("POST", "/unsubscribe/{token}", "One-click unsubscribe (RFC 8058)", None,
       media="text/html", errors=(404,)),
)

_ERROR_TEXT = {
    400: "the body is not JSON",
    401: "missing, unknown or revoked key",
    403: "the key's scope (or sender domains) do not allow this",
    404: "no such resource",
    409: "conflicts with the resource's state or an idempotency key",
    413: "the body or the message is too large",
    422: "invalid fields: `details` names them",
    429: "over a rate limit: retry after `Retry-After` seconds",
    500: "an unexpected error (`internal_error`); it has been logged",
    503: "shutting down or the spool is unavailable: retry later",
    507: "the spool's disk is full: retry later",
}


def _models(ops: Sequence[Op]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (m.ErrorOut, "serialization"): None
    }
    for op in ops:
        if op.request is not None:
            wanted[(op.request, "validation")] = None
        if op.response is not None:
            wanted[(op.response, "serialization")] = None
    return list(wanted)


def document(ops: Sequence[Op] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `ops`."""
    refs, defs = models_json_schema(_models(ops), ref_template=_REF, by_alias=True)
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Postroom",
            "version": "1",
            "description": "Self-hosted SMTP relay with an HTTP API. Errors are "
            "`{error, message, details}`; see the README for every slug.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(op: Op, refs: dict[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.method.lower() + re.sub(r"[^a-z0-9]+", "_", op.path),
        "security": [{"bearer": []}] if op.scope else [],
    }
    params = [
        {"name": p.name, "in": p.where, "required": p.required, "schema": p.schema,
         **({"description": p.description} if p.description else {})}
        for p in op.params
    ]
    for name in reversed(re.findall(r"{(\w+)}", op.path)):
        params.insert(0, {"name": name, "in": "path", "required": True, "schema": _string()})
    if params:
        out["parameters"] = params
    if op.scope:
        out["description"] = f"API key scope: `{op.scope}`."
    if op.request is not None:
        schema = refs[(op.request, "validation")]
        if op.request_is_array:
            schema = {"type": "array", "minItems": 1, "items": schema}
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    responses: dict[str, Any] = {}
    for status in (op.ok, *op.extra_ok):
        if op.response is not None:
            content = {op.media: {"schema": refs[(op.response, "serialization")]}}
            responses[str(status)] = {"description": "OK", "content": content}
        elif status == 204:
            responses[str(status)] = {"description": "done; no body"}
        elif op.media == "application/json":
            responses[str(status)] = {
                "description": "OK", "content": {op.media: {"schema": {"type": "object"}}}
            }
        else:
            responses[str(status)] = {
                "description": "OK", "content": {op.media: {"schema": {"type": "string"}}}
            }
    errors = set(op.errors) | {500, 503}
    if op.writes:  # every spool write can find the disk full (api/errors.py, from_store_error)
        errors |= {507}
    if op.scope:
        errors |= {401, 403, 429}
    error_ref = refs[(m.ErrorOut, "serialization")]
    for status in sorted(errors):
        if str(status) in responses:
            continue
        # Pages for people (the unsubscribe links) say "not found" as a page too.
        content = (
            {op.media: {"schema": {"type": "string"}}}
            if op.media == "text/html" and status == 404
            else {"application/json": {"schema": error_ref}}
        )
        responses[str(status)] = {"description": _ERROR_TEXT[status], "content": content}
    out["responses"] = responses
    return out


def endpoint(spec: dict[str, Any]) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The route that serves `spec` (built once, at start-up)."""

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(spec)

    return openapi_json
