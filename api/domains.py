"""Sending-domain routes: add (keys generated, records returned), list, show, change the default
sender name, remove, and verify the published records live. Keys never leave the spool.

Each domain shown carries `status`: `ok`, or `key_damaged` when its stored DKIM key does not
decrypt — then no records (they are derived from the key) and a `problem` that says how to
replace it. One damaged domain never fails the list; verifying it is a 500 `dkim_key_damaged`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.body import read_object
from api.errors import NotFoundError, ServiceUnavailable, damaged_key_message
from api.models import DomainCreate, DomainOut, DomainPatch, check_domain_name
from api.types import AppState, DomainTools
from store import DomainKeys, Scope, UnreadableKeys


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    return state


def _tools(state: AppState) -> DomainTools:
    if state.domain_tools is None:
        raise ServiceUnavailable("domain management is not available")
    return state.domain_tools


def _name(request: Request) -> str:
    try:
        return check_domain_name(request.path_params["name"])
    except ValueError:
        raise NotFoundError(f"no sending domain {request.path_params['name']}") from None


def _out(
    state: AppState, keys: DomainKeys, damage: UnreadableKeys | None = None
) -> dict[str, object]:
    if damage is not None:
        return DomainOut.of(keys, [], damaged_key_message(damage)).to_json()
    return DomainOut.of(keys, _tools(state).records(keys)).to_json()


async def add_domain(request: Request) -> JSONResponse:
    state = await _state(request)
    wanted = await read_object(request, DomainCreate)
    tools = _tools(state)
    # RSA key generation takes tens of milliseconds: off the event loop.
    keys = await asyncio.to_thread(
        tools.generate, wanted.name, wanted.selector, wanted.algorithm == "both", time.time()
    )
    keys = dataclasses.replace(keys, default_sender_name=wanted.default_sender_name)
    await state.spool.add_domain(keys)
    return JSONResponse(_out(state, keys), status_code=201)


async def list_domains(request: Request) -> JSONResponse:
    state = await _state(request)
    found = await state.spool.inspect_domains()
    return JSONResponse({"data": [_out(state, keys, damage) for keys, damage in found]})


async def get_domain(request: Request) -> JSONResponse:
    state = await _state(request)
    keys, damage = await state.spool.inspect_domain(_name(request))
    return JSONResponse(_out(state, keys, damage))


async def patch_domain(request: Request) -> JSONResponse:
    state = await _state(request)
    name = _name(request)
    change = await read_object(request, DomainPatch)
    await state.spool.set_default_sender_name(name, change.default_sender_name)
    keys, damage = await state.spool.inspect_domain(name)
    return JSONResponse(_out(state, keys, damage))


async def remove_domain(request: Request) -> Response:
    state = await _state(request)
    await state.spool.remove_domain(_name(request))
    return Response(status_code=204)


async def verify_domain(request: Request) -> JSONResponse:
    state = await _state(request)
    keys = await state.spool.get_domain(_name(request))
    records = await _tools(state).verify(keys)
    out = DomainOut.of(keys, records).to_json()
    out["verified"] = all(r.status.value == "ok" for r in records)
    return JSONResponse(out)


routes = [
    Route("/v1/domains", add_domain, methods=["POST"]),
    Route("/v1/domains", list_domains, methods=["GET"]),
    Route("/v1/domains/{name}", get_domain, methods=["GET"]),
    Route("/v1/domains/{name}", patch_domain, methods=["PATCH"]),
    Route("/v1/domains/{name}", remove_domain, methods=["DELETE"]),
    Route("/v1/domains/{name}/verify", verify_domain, methods=["POST"]),
]
