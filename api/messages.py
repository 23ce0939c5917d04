"""Message endpoints: send one, send a batch, the channel-tagged compat routes, read one back.

Every send goes through one pipeline: each item is validated and composed (`prepare`), its
idempotency key is held — replaying the first answer or refusing where the key says so — its
recipients' domains are checked, and the survivors go to the spool together, so a batch costs a
few commits rather than one per message. A refused item changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from api.auth import KeyCheck, admit, authenticate, bearer, check_key
from api.body import read_json
from api.compose import compose, envelope_recipients, envelope_sender
from api.errors import (
    ApiError,
    Detail,
    Forbidden,
    InvalidRecipient,
    TemplateRenderError,
    ValidationFailed,
    body_of,
    from_store_error,
    from_validation_error,
)
from api.models import (
    AcceptedOut,
    CompatSendRequest,
    MessageOut,
    SendRequest,
    check_idempotency_key,
    parse_mailbox,
    refuse_unencodable,
)
from api.template_engine import RenderError, render
from api.types import AppState
from config import Settings
from store import (
    Accepted,
    IdempotencyConflict,
    IdempotencyKey,
    MessageType,
    NotFound,
    Principal,
    Priority,
    Scope,
    Source,
    Spool,
    StoreError,
    Submission,
    Tag,
    Template,
    domain_of,
    format_time,
    pickled_by_fields,
)

REPLAYED_HEADER = "Idempotent-Replayed"


# -- one item through validation and composition (pure: no I/O, runs in a thread for batches) ---


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Item:
    """One send request on its way: ready to accept, or refused with an error."""

    key: IdempotencyKey | None = None
    submission: Submission | None = None
    recipients: tuple[tuple[str, str], ...] = ()  # (field path, ASCII address)
    error: ApiError | None = None
    compat_key: str | None = None  # the key a compat request was answered with


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Sent:
    accepted: Accepted
    replayed: bool = False


Result = Sent | ApiError


def fingerprint(body: object) -> bytes:
    """SHA-256 of the request's canonical JSON, its idempotency key left out."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "idempotency_key"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def idempotency_key_of(body: object, header: str | None) -> IdempotencyKey | None:
    """The request's idempotency key: the header, else the body's `idempotency_key`."""
    in_body = body.get("idempotency_key") if isinstance(body, dict) else None
    if header is not None:
        try:
            check_idempotency_key(header)
        except ValueError as exc:
            raise ValidationFailed(details=[Detail("Idempotency-Key", str(exc))]) from None
        if isinstance(in_body, str) and in_body != header:
            raise ValidationFailed(
                details=[Detail("idempotency_key", "differs from the Idempotency-Key header")]
            )
        return IdempotencyKey(header, fingerprint(body))
    if isinstance(in_body, str):
        try:
            check_idempotency_key(in_body)
        except ValueError:
            return None  # validation names the field
        return IdempotencyKey(in_body, fingerprint(body))
    return None


def check_limits(send: SendRequest, settings: Settings, now: float) -> None:
    """Recipient counts and the schedule: what the model cannot know (settings, the clock)."""
    per_field = settings.api.max_recipients_per_field
    details = [
        Detail(name, f"at most {per_field} addresses")
        for name, values in (("to", send.to), ("cc", send.cc), ("bcc", send.bcc))
        if len(values) > per_field
    ]
    if send.scheduled_at is not None and send.scheduled_at.timestamp() <= now:
        details.append(Detail("scheduled_at", "must be in the future"))
    if details:
        raise ValidationFailed(details=details)
    total = len({a.lower() for _, a in envelope_recipients(send)})
    if total > settings.smtp.max_recipients:
        raise ValidationFailed(
            f"at most {settings.smtp.max_recipients} recipients per message",
            [Detail("to", "too many recipients in to, cc and bcc together")],
            slug="too_many_recipients",
        )


# -- templates and default sender names (read once per request, applied per item) ----------------


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class SendContext:
    """What the items of one request need from the spool: their templates (by the id or name
    they used) and the default sender names of their From domains."""

    templates: Mapping[str, Template] = field(default_factory=dict)
    sender_names: Mapping[str, str] = field(default_factory=dict)


_TEMPLATE_FIELDS = (("template_id", "template"), ("template_vars", "template_data"))


def _template_ref(body: Mapping[str, Any]) -> Any:
    return body.get("template_id", body.get("template"))


def _from_value(body: Mapping[str, Any]) -> Any:
    if "from" in body:
        return body["from"]
    metadata = body.get("metadata")
    return metadata.get("from_email") if isinstance(metadata, dict) else None


async def load_context(spool: Spool, bodies: Sequence[object]) -> SendContext:
    """The templates and default sender names `bodies` refer to (unknown ones left out)."""
    return await load_wanted(spool, *context_wanted(bodies))


def context_wanted(bodies: Sequence[object]) -> tuple[list[str], list[str]]:
    """The template ids or names and the From domains `bodies` need looked up, sorted."""
    refs: set[str] = set()
    domains: set[str] = set()
    for body in bodies:
        if not isinstance(body, dict):
            continue
        ref = _template_ref(body)
        if isinstance(ref, str) and ref:
            refs.add(ref)
        sender = _from_value(body)
        if isinstance(sender, str):
            try:
                display, address = parse_mailbox(sender)
            except ValueError:
                continue  # validation names it
            if not display:  # a sender with a name of its own keeps it (`prepare`)
                domains.add(address.rpartition("@")[2])
    return sorted(refs), sorted(domains)


async def load_wanted(spool: Spool, refs: Sequence[str], domains: Sequence[str]) -> SendContext:
    """The templates `refs` names and the default sender names of `domains` (unknown ones left
    out)."""
    templates: dict[str, Template] = {}
    for ref in refs:
        try:
            templates[ref] = await spool.get_template(ref)
        except NotFound:
            pass
    names = await spool.default_sender_names(domains) if domains else {}
    return SendContext(templates, names)


async def check_key_for_send(
    state: AppState, client: str, secret: str, refs: Sequence[str], domains: Sequence[str]
) -> tuple[KeyCheck, SendContext | None]:
    """The key check and, when it lets the request go on, what its body needs from the spool:
    what the service answers a worker's single send in one round trip (`ServiceLink`)."""
    check = await check_key(state, client, secret)
    if not check.admits:
        return check, None
    return check, await load_wanted(state.spool, refs, domains)


async def _start_single(request: Request, state: AppState) -> tuple[Principal, Any, SendContext]:
    """A single send's principal, body and context, the errors in the order of a key check
    first: 429/401/403 before 413/400.

    In a worker, a body of at most `_EARLY_READ` bytes is read first, so that the service checks
    the key and looks up what the body needs in one round trip instead of two; its read error,
    if any, comes after the key's. A larger or unsized body is read only after the key check,
    so that no client without a key makes the worker parse much.
    """
    link = state.link
    limit = state.settings.api.max_request_size
    declared = request.headers.get("content-length", "")
    if link is None or not declared.isdigit() or int(declared) > _EARLY_READ:
        principal = await authenticate(request, Scope.SEND)
        body = await read_json(request, limit)
        return principal, body, await load_context(state.spool, [body])
    client, secret = bearer(request)
    unread: ApiError | None = None
    try:
        body = await read_json(request, limit)
    except ApiError as exc:
        body, unread = None, exc
    refs, domains = context_wanted([body])
    check, context = await link.check_key_for_send(client, secret, refs, domains)
    principal = admit(request, check, Scope.SEND)
    if unread is not None:
        raise unread
    assert context is not None  # admitted: the service looked it up
    return principal, body, context


#: A single send's body up to this size is read before its key is checked (`_start_single`).
_EARLY_READ = 64 * 1024


def apply_template(body: dict[str, Any], context: SendContext) -> dict[str, Any]:
    """The request with its template's subject, html and text filled in where it has none.

    `template_id` + `template_vars`, or the aliases `template` + `template_data`. A missing
    variable is `422 template_render_error` naming it.
    """
    given = {}
    for name, alias in _TEMPLATE_FIELDS:
        if name in body and alias in body:
            raise ValidationFailed(details=[Detail(alias, f"give {name} or {alias}, not both")])
        given[name] = (name, body[name]) if name in body else (alias, body.get(alias))
    (ref_field, ref), (vars_field, variables) = given["template_id"], given["template_vars"]
    if ref is None:
        if variables is not None:
            raise ValidationFailed(details=[Detail(vars_field, "needs template_id")])
        return body
    if not isinstance(ref, str) or not ref:
        raise ValidationFailed(details=[Detail(ref_field, "must be a template id or name")])
    if variables is not None and not isinstance(variables, dict):
        raise ValidationFailed(details=[Detail(vars_field, "must be a JSON object")])
    template = context.templates.get(ref)
    if template is None:
        raise ValidationFailed(details=[Detail(ref_field, f"no template {ref}")])
    try:
        rendered = render(template, variables or {})
    except RenderError as exc:
        raise TemplateRenderError(
            f"template {template.name}: {exc}", [Detail(f"{vars_field} ({exc.field})", str(exc))]
        ) from None
    out = {k: v for k, v in body.items() if k not in ("template_id", "template",
                                                     "template_vars", "template_data")}
    out.setdefault("subject", rendered.subject)
    for part in ("html", "text"):
        value = getattr(rendered, part)
        if value is not None:
            out.setdefault(part, value)
    return out


def format_mailbox(name: str, address: str) -> str:
    """A name-addr with the name quoted as `parse_mailbox` reads it back."""
    quoted = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}" <{address}>'


def prepare(
    body: object,
    principal: Principal,
    settings: Settings,
    now: float,
    header_key: str | None = None,
    context: SendContext = SendContext(),  # frozen: a safe default
) -> Item:
    """Validate and compose one request; an `Item` carrying its error if it is refused."""
    key: IdempotencyKey | None = None
    try:
        key = idempotency_key_of(body, header_key)
        if not isinstance(body, dict):
            raise ValidationFailed("each message must be a JSON object")
        refuse_unencodable(body)
        body = apply_template(body, context)
        try:
            send = SendRequest.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        check_limits(send, settings, now)
        display, sender = parse_mailbox(send.from_)
        if not display and (default := context.sender_names.get(domain_of(sender))):
            send.from_ = format_mailbox(default, sender)  # the domain's default sender name
        sender = envelope_sender(send)
        if not principal.may_send_from(domain_of(sender)):
            raise Forbidden(
                f"this API key may not send from {domain_of(sender)}",
                [Detail("from", "the domain is not one of this API key's sender domains")],
                slug="sender_not_allowed",
            )
        try:
            content = compose(send, settings.server.hostname, now)
        except ValueError as exc:  # what EmailMessage refuses despite validation
            raise ValidationFailed(details=[Detail("body", str(exc))]) from None
    except ApiError as error:
        return Item(key=key, error=error)
    recipients = tuple(envelope_recipients(send))
    submission = Submission(
        mail_from=sender,
        recipients=tuple(address for _, address in recipients),
        content=content,
        source=Source.API,
        principal=principal,
        tags=tuple(Tag(t.name, t.value) for t in send.tags),
        metadata=dict(send.metadata),
        message_type=MessageType(send.message_type),
        priority=Priority(send.priority),
        scheduled_at=send.scheduled_at.timestamp() if send.scheduled_at else None,
        idempotency=key,
    )
    return Item(key=key, submission=submission, recipients=recipients)


# -- the channel-tagged compat shape ---------------------------------------------------------------

# Where a native field came from in the compat shape, to name it in errors.
_COMPAT_PATHS = {
    "from": "metadata.from_email",
    "to[0]": "destination.email",
    "to": "destination.email",
    "subject": "payload.subject",
    "text": "payload.body_text",
    "html": "payload.body_html",
}


def prepare_compat(
    body: object, principal: Principal, settings: Settings, now: float,
    header_key: str | None = None,
    context: SendContext = SendContext(),  # frozen: a safe default
) -> Item:
    """Translate a channel-tagged request into a native one and prepare that."""
    try:
        if not isinstance(body, dict):
            raise ValidationFailed("each message must be a JSON object")
        # The channel first: another channel's shape is not refused as a malformed email.
        channel = body.get("channel")
        if isinstance(channel, str) and channel != "email":
            raise ValidationFailed(
                f"channel {channel!r} is not enabled; only 'email' is",
                [Detail("channel", "only 'email' is enabled")],
                slug="channel_not_enabled",
            )
        refuse_unencodable(body)
        try:
            compat = CompatSendRequest.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        metadata = dict(compat.metadata)
        if "from_email" not in metadata:
            raise ValidationFailed(details=[Detail("metadata.from_email", "Field required")])
        given = idempotency_key_of(body, header_key)  # the header checked as /v1/messages does
        key = given.key if given is not None else f"gen_{uuid.uuid4().hex}"
    except ApiError as error:
        return Item(error=error)
    native: dict[str, Any] = {
        "from": metadata.pop("from_email"),
        "to": compat.destination.email,
        "message_type": compat.message_type,
        "metadata": metadata,
    }
    if compat.payload.subject is not None:
        native["subject"] = compat.payload.subject
    if compat.payload.body_text is not None:
        native["text"] = compat.payload.body_text
    if compat.payload.body_html is not None:
        native["html"] = compat.payload.body_html
    for name in ("template_id", "template", "template_vars", "template_data"):
        if (value := getattr(compat, name)) is not None:
            native[name] = value
    item = prepare(native, principal, settings, now, context=context)
    idem = IdempotencyKey(key, fingerprint(body))
    submission = item.submission
    if submission is not None:
        submission = replace(submission, idempotency=idem)
    refused = item.error
    if refused is not None:
        refused.details = [
            Detail(_COMPAT_PATHS.get(d.field, d.field), d.message) for d in refused.details
        ]
    return Item(idem, submission, item.recipients, refused, compat_key=key)


# -- the pipeline ----------------------------------------------------------------------------------


async def send_items(state: AppState, principal: Principal, items: list[Item]) -> list[Result]:
    """Hold keys, check recipient domains, accept the survivors together; results in order.

    In a worker process, the service does this part (`AppState.link`): the items travel
    validated and composed, and the answer comes after the service's commit."""
    if state.link is not None:
        return await state.link.send(principal, items)
    spool = state.spool
    async with spool.hold_idempotency_keys(principal, [i.key for i in items]) as verdicts:
        results: list[Result | None] = []
        for item, verdict in zip(items, verdicts, strict=True):
            if isinstance(verdict, Accepted):
                results.append(Sent(verdict, replayed=True))
            elif isinstance(verdict, IdempotencyConflict):
                results.append(from_store_error(verdict))
            else:
                results.append(item.error)
        if state.domains is not None:
            await _check_domains(state, items, results)
        live = [i for i, result in enumerate(results) if result is None]
        submissions = []
        for i in live:
            submission = items[i].submission
            assert submission is not None
            submissions.append(submission)
        if submissions:
            outcomes = await spool.accept_many(submissions)
            for i, outcome in zip(live, outcomes, strict=True):
                results[i] = (
                    Sent(outcome) if isinstance(outcome, Accepted) else from_store_error(outcome)
                )
    return [r if r is not None else ApiError() for r in results]


async def _check_domains(state: AppState, items: list[Item], results: list[Result | None]) -> None:
    assert state.domains is not None
    live = [i for i, result in enumerate(results) if result is None]
    refusals = await state.domains.refusals(
        domain_of(address) for i in live for _, address in items[i].recipients
    )
    if not refusals:
        return
    for i in live:
        bad = [
            Detail(path, f"{address}: {refusals[domain_of(address)]}")
            for path, address in items[i].recipients
            if domain_of(address) in refusals
        ]
        if bad:
            results[i] = InvalidRecipient(
                f"{bad[0].message}" if len(bad) == 1 else f"{len(bad)} recipients cannot get mail",
                bad,
            )


def accepted_body(accepted: Accepted) -> dict[str, Any]:
    out = AcceptedOut(
        id=accepted.id, status=accepted.status.value, created_at=format_time(accepted.created_at)
    )
    return out.model_dump()


def _single(result: Result, extra: dict[str, Any] | None = None) -> JSONResponse:
    if isinstance(result, ApiError):
        raise result
    headers = {REPLAYED_HEADER: "true"} if result.replayed else {}
    return JSONResponse(
        {**accepted_body(result.accepted), **(extra or {})}, status_code=202, headers=headers
    )


def _batch(results: list[Result], items: list[Item]) -> JSONResponse:
    data = []
    for result, item in zip(results, items, strict=True):
        if isinstance(result, ApiError):
            entry = body_of(result)
        else:
            entry = accepted_body(result.accepted)
            if result.replayed:
                entry["replayed"] = True
        if item.compat_key is not None:
            entry["idempotency_key"] = item.compat_key
        data.append(entry)
    every = all(isinstance(r, Sent) for r in results)
    return JSONResponse({"data": data}, status_code=200 if every else 207)


async def _read_batch(request: Request, state: AppState) -> list[Any]:
    if request.headers.get("idempotency-key") is not None:
        raise ValidationFailed(
            details=[Detail("Idempotency-Key", "give each item its own idempotency_key")]
        )
    body = await read_json(request, state.settings.api.max_request_size)
    if not isinstance(body, list) or not body:
        raise ValidationFailed("the request body must be a non-empty JSON array of messages")
    if len(body) > state.settings.api.max_batch:
        raise ValidationFailed(
            details=[Detail("body", f"at most {state.settings.api.max_batch} messages per batch")]
        )
    return body


# -- endpoints -------------------------------------------------------------------------------------


Prepare = Callable[..., Item]  # `prepare` or `prepare_compat`

#: Batches at least this long are shared between the CPU pool's processes and this one.
_SHARED_BATCH = 200


def prepare_all(
    function: Prepare, bodies: list[object], principal: Principal, settings: Settings,
    now: float, context: SendContext,
) -> list[Item]:
    """`function` over each body, in order: a batch, or one share of it."""
    return [function(body, principal, settings, now, context=context) for body in bodies]


async def prepare_one(
    state: AppState, function: Prepare, body: object, principal: Principal, now: float,
    header: str | None, context: SendContext,
) -> Item:
    """One request's item, validated and composed in the CPU pool when there is one."""
    pool = state.cpu_pool
    if pool is not None and pool.width:
        return await pool.offload(function, body, principal, state.settings, now, header, context)
    return function(body, principal, state.settings, now, header, context)


async def prepare_batch(
    state: AppState, function: Prepare, bodies: list[object], principal: Principal, now: float,
    context: SendContext,
) -> list[Item]:
    """A batch's items, in order. Validation and composition are CPU work, kept off the event
    loop: in a thread, and split with the CPU pool's processes when the batch is long."""
    pool = state.cpu_pool
    width = pool.width if pool is not None else 0
    if pool is None or not width or len(bodies) < _SHARED_BATCH:
        return await asyncio.to_thread(
            prepare_all, function, bodies, principal, state.settings, now, context
        )
    size = -(-len(bodies) // (width + 1))  # one share for a thread here, one per process
    shares = [bodies[i : i + size] for i in range(0, len(bodies), size)]
    parts = await asyncio.gather(
        asyncio.to_thread(
            prepare_all, function, shares[0], principal, state.settings, now, context
        ),
        *(
            pool.offload(prepare_all, function, share, principal, state.settings, now, context)
            for share in shares[1:]
        ),
    )
    return [item for part in parts for item in part]


#: A worker hands a longer batch to the service in chunks of this many items, each as soon as
#: it is composed: the service stores one chunk while the worker composes the next.
SEND_CHUNK = 1000


async def prepare_and_send(
    state: AppState, function: Prepare, bodies: list[object], principal: Principal,
    now: float, context: SendContext,
) -> tuple[list[Item], list[Result]]:
    """A batch's items and their results, in order.

    In a worker process a long batch goes to the service chunk by chunk (`SEND_CHUNK`). The
    answers are those of one `send_items` over the whole batch: a key already used by an
    earlier item is `in_progress` (the batch holds it), and a chunk the service could not take
    fails only its own items, unless no chunk was taken at all (then the request fails, as one
    send would). Each chunk is committed before its results exist, so `200`/`207` still
    follows the commits.
    """
    if state.link is None or len(bodies) <= SEND_CHUNK:
        whole = await prepare_batch(state, function, bodies, principal, now, context)
        return whole, await send_items(state, principal, whole)
    items: list[Item] = []
    results: list[Result | None] = []
    sends: list[tuple[list[int], asyncio.Task[list[Result]]]] = []
    held: set[str] = set()
    try:
        for start in range(0, len(bodies), SEND_CHUNK):
            chunk = await asyncio.to_thread(
                prepare_all, function, bodies[start : start + SEND_CHUNK], principal,
                state.settings, now, context,
            )
            positions = []
            for item in chunk:
                positions.append(len(items))
                items.append(item)
                results.append(None)
                if item.key is None:
                    continue
                if item.key.key in held:  # held by an earlier chunk of this batch
                    results[-1] = from_store_error(
                        IdempotencyConflict(IdempotencyConflict.IN_PROGRESS)
                    )
                    positions.pop()
                    continue
                held.add(item.key.key)
            if positions:
                task = asyncio.create_task(
                    send_items(state, principal, [items[i] for i in positions])
                )
                sends.append((positions, task))
    finally:
        outcomes = await asyncio.gather(*(task for _, task in sends), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    for failure in failures:
        if not isinstance(failure, StoreError | ApiError):
            raise failure
    if failures and len(failures) == len(outcomes):
        raise failures[0]
    for (positions, _), outcome in zip(sends, outcomes, strict=True):
        if isinstance(outcome, StoreError | ApiError):
            error = outcome if isinstance(outcome, ApiError) else from_store_error(outcome)
            for i in positions:
                results[i] = error
        elif not isinstance(outcome, BaseException):
            for i, result in zip(positions, outcome, strict=True):
                results[i] = result
    return items, [r if r is not None else ApiError() for r in results]


async def send_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    principal, body, context = await _start_single(request, state)
    header = request.headers.get("idempotency-key")
    item = await prepare_one(state, prepare, body, principal, time.time(), header, context)
    [result] = await send_items(state, principal, [item])
    return _single(result)


async def send_batch(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    principal = await authenticate(request, Scope.SEND)
    bodies = await _read_batch(request, state)
    context = await load_context(state.spool, bodies)
    items, results = await prepare_and_send(
        state, prepare, bodies, principal, time.time(), context
    )
    return _batch(results, items)


async def send_compat(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    principal, body, context = await _start_single(request, state)
    header = request.headers.get("idempotency-key")
    item = await prepare_one(state, prepare_compat, body, principal, time.time(), header, context)
    [result] = await send_items(state, principal, [item])
    return _single(result, {"idempotency_key": item.compat_key} if item.compat_key else None)


async def send_compat_batch(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    principal = await authenticate(request, Scope.SEND)
    bodies = await _read_batch(request, state)
    context = await load_context(state.spool, bodies)
    items, results = await prepare_and_send(
        state, prepare_compat, bodies, principal, time.time(), context
    )
    return _batch(results, items)


async def get_message(request: Request) -> JSONResponse:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    message = await state.spool.get_message(request.path_params["id"])
    return JSONResponse(MessageOut.of(message).to_json())
