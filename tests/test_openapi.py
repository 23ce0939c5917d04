"""The published contract: /openapi.json covers every route, and the live server keeps it.

The schemathesis run drives the real server with generated requests for every operation (a
bounded, seeded number of examples) and checks that none gets a 5xx and that every answer's
status, content type and body match the document.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from starlette.routing import Route

from api import create_app
from api.openapi import OPERATIONS
from store import Scope
from tests.conftest import Running

ST = Path(sys.executable).with_name("st")


async def test_every_route_is_in_the_document(postroom: Running):
    app = create_app(postroom.spool, postroom.service.settings, postroom.service.readiness)
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert routes == {(op.method, op.path) for op in OPERATIONS}
    async with postroom.http() as client:
        spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"] == "3.1.0"
    send = spec["paths"]["/v1/messages"]["post"]
    assert send["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SendRequest"
    )
    assert {"202", "401", "403", "409", "413", "422", "429", "503", "507"} <= set(
        send["responses"]
    )
    listing = spec["paths"]["/v1/messages"]["get"]
    assert {p["name"] for p in listing["parameters"]} >= {"status", "cursor", "limit", "from"}
    # Every route that writes to the spool can find its disk full; any route can fail.
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            assert "500" in operation["responses"], (method, path)
            if method != "get":
                assert ("507" in operation["responses"]) == (
                    (method, path) != ("post", "/v1/domains/{name}/verify")
                ), (method, path)
            else:
                assert "507" not in operation["responses"], (method, path)
    for method, path in [("delete", "/v1/messages/{id}"), ("post", "/v1/webhooks"),
                         ("put", "/v1/templates/{id}"), ("post", "/unsubscribe/{token}")]:
        assert spec["paths"][path][method]["responses"]["507"]["content"][
            "application/json"]["schema"]["$ref"].endswith("/ErrorOut")


async def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(postroom: Running,
                                                                   tmp_path: Path):
    # A test-mode key: whatever the generated sends look like, nothing leaves the machine.
    key = await postroom.spool.create_key("fuzz", Scope.FULL, is_test=True)
    proc = await asyncio.create_subprocess_exec(
        str(ST), "run", f"{postroom.api_url}/openapi.json",
        "--header", f"Authorization: Bearer {key.secret}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--exclude-path", "/v1/events/stream",  # an endless stream: nothing to compare
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", "8", "--seed", "20261123", "--workers", "1",
        "--generation-database", "none", "--no-color", "--request-timeout", "10",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, text[-6000:]
    # Every operation but the excluded stream was selected, and every selected one tested.
    selected = re.search(r"Selected: (\d+)/(\d+)", text)
    tested = re.search(r"Tested: (\d+)", text)
    assert selected and tested, text[-3000:]
    assert int(tested.group(1)) == int(selected.group(1)) == int(selected.group(2)) - 1
