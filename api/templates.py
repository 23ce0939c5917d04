"""Template routes: create, list, show, replace, delete. Each part must compile when stored;
rendering happens when a message names the template (api/template_engine.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.body import read_object
from api.errors import Detail, ValidationFailed
from api.models import TemplateIn, TemplateOut
from api.template_engine import check_syntax
from api.types import AppState
from store import Scope


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.postroom
    await authenticate(request, Scope.FULL)
    return state


def check_template(wanted: TemplateIn) -> None:
    problems = check_syntax(wanted.subject, wanted.html, wanted.text)
    if problems:
        raise ValidationFailed(
            "the template does not compile",
            [Detail(p.field, str(p)) for p in problems],
            slug="template_invalid",
        )


async def create_template(request: Request) -> JSONResponse:
    state = await _state(request)
    wanted = await read_object(request, TemplateIn)
    check_template(wanted)
    template = await state.spool.create_template(
        wanted.name, wanted.subject, wanted.html, wanted.text
    )
    return JSONResponse(TemplateOut.of(template).model_dump(), status_code=201)


async def list_templates(request: Request) -> JSONResponse:
    state = await _state(request)
    found = await state.spool.list_templates()
    return JSONResponse({"data": [TemplateOut.of(t).model_dump() for t in found]})


async def get_template(request: Request) -> JSONResponse:
    state = await _state(request)
    template = await state.spool.get_template(request.path_params["id"])
    return JSONResponse(TemplateOut.of(template).model_dump())


async def replace_template(request: Request) -> JSONResponse:
    state = await _state(request)
    wanted = await read_object(request, TemplateIn)
    check_template(wanted)
    template = await state.spool.update_template(
        request.path_params["id"], wanted.name, wanted.subject, wanted.html, wanted.text
    )
    return JSONResponse(TemplateOut.of(template).model_dump())


async def delete_template(request: Request) -> Response:
    state = await _state(request)
    await state.spool.delete_template(request.path_params["id"])
    return Response(status_code=204)


routes = [
    Route("/v1/templates", create_template, methods=["POST"]),
    Route("/v1/templates", list_templates, methods=["GET"]),
    Route("/v1/templates/{id}", get_template, methods=["GET"]),
    Route("/v1/templates/{id}", replace_template, methods=["PUT"]),
    Route("/v1/templates/{id}", delete_template, methods=["DELETE"]),
]
