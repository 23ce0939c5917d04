"""Templates: stored over the API and the CLI, rendered in Jinja2's sandbox when a message names
one — html escaped, subject and text not, a missing variable refused by name, the aliases — and
the rendered message is what is stored, signed and delivered."""

from __future__ import annotations

import email
import json
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, cast

import pytest

from api.template_engine import RenderError, render
from store import Template
from tests.conftest import Running, postroom_cli, settings_data, write_config
from tests.support import DnsServer, MxSink

WELCOME = {
    "name": "welcome",
    "subject": "Welcome, {{ name }} & co",
    "html": "<p>Hello {{ name }}</p>",
    "text": "Hello {{ name }}, see {{ link }}",
}


def parse(data: bytes) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(data, policy=default_policy))


def part(message: EmailMessage, subtype: str) -> str:
    body = message.get_body((subtype,))
    assert body is not None
    return cast(str, cast(EmailMessage, body).get_content()).replace("\r\n", "\n")


async def test_templates_crud_render_escape_and_aliases(postroom: Running, mx_sink: MxSink):
    key = await postroom.new_key()
    async with postroom.http(key) as http:
        created = await http.post("/v1/templates", json=WELCOME)
        assert created.status_code == 201, created.text
        tpl = created.json()
        assert tpl["id"].startswith("tpl_") and tpl["name"] == "welcome"
        assert (await http.post("/v1/templates", json=WELCOME)).status_code == 409
        broken = await http.post("/v1/templates", json={**WELCOME, "name": "x",
                                                        "html": "{% if %}"})
        assert broken.status_code == 422 and broken.json()["details"][0]["field"] == "html"

        evil = {"name": "<b>Ann</b>", "link": "https://x.test/?a=1&b=2"}
        base = {"from": "app@acme.test", "to": "user@example.test"}
        sent = await http.post("/v1/messages", json={**base, "template_id": tpl["id"],
                                                      "template_vars": evil})
        assert sent.status_code == 202, sent.text
        aliased = await http.post("/v1/messages", json={**base, "template": "welcome",
                                                         "template_data": {"name": "Bo",
                                                                           "link": "l"},
                                                         "subject": "Own subject"})
        assert aliased.status_code == 202, aliased.text
        compat = await http.post("/v1/send", json={
            "channel": "email", "destination": {"email": "user@example.test"},
            "metadata": {"from_email": "app@acme.test"},
            "template_id": "welcome", "template_vars": {"name": "Cy", "link": "l"},
        })
        assert compat.status_code == 202, compat.text

        missing = await http.post("/v1/messages", json={**base, "template_id": "welcome",
                                                         "template_vars": {"name": "x"}})
        assert missing.status_code == 422
        assert missing.json()["error"] == "template_render_error"
        assert "'link'" in missing.json()["message"]
        unknown = await http.post("/v1/messages", json={**base, "template": "nope"})
        assert unknown.status_code == 422 and unknown.json()["details"][0]["field"] == "template"
        both = await http.post("/v1/messages", json={**base, "template": "welcome",
                                                      "template_id": "welcome"})
        assert both.status_code == 422
        batch = await http.post("/v1/messages/batch", json=[
            {**base, "template_id": "welcome", "template_vars": {"name": "D", "link": "l"}},
            {**base, "template_id": "welcome", "template_vars": {}},
        ])
        assert batch.status_code == 207
        assert batch.json()["data"][1]["error"] == "template_render_error"

        replaced = await http.put(f"/v1/templates/{tpl['id']}",
                                  json={**WELCOME, "subject": "New {{ name }}"})
        assert replaced.status_code == 200 and replaced.json()["subject"] == "New {{ name }}"
        listed = (await http.get("/v1/templates")).json()["data"]
        assert [t["name"] for t in listed] == ["welcome"]
        assert (await http.get("/v1/templates/welcome")).json()["id"] == tpl["id"]
        assert (await http.delete("/v1/templates/welcome")).status_code == 204
        assert (await http.get(f"/v1/templates/{tpl['id']}")).status_code == 404

    received = await mx_sink.wait_for_messages(4)
    by_subject = {str(parse(r.data)["Subject"]): parse(r.data) for r in received}
    first = by_subject["Welcome, <b>Ann</b> & co"]  # the subject is not escaped
    assert part(first, "html") == "<p>Hello &lt;b&gt;Ann&lt;/b&gt;</p>\n"
    assert part(first, "plain") == "Hello <b>Ann</b>, see https://x.test/?a=1&b=2\n"
    assert part(by_subject["Own subject"], "plain") == "Hello Bo, see l\n"
    assert "Welcome, Cy & co" in by_subject and "Welcome, D & co" in by_subject
    stored = await postroom.spool.get_message(sent.json()["id"])
    assert stored.subject == "Welcome, <b>Ann</b> & co"


@pytest.mark.parametrize(
    ("source", "variables", "field", "message"),
    [
        ("{{ user.name }}", {"user": {}}, "text", "a variable is missing"),
        ("{{ x.__class__.__mro__ }}", {"x": 1}, "text", "not allowed in a template"),
        ("{{ 1 / 0 }}", {}, "text", "ZeroDivisionError"),
    ],
)
def test_render_errors(source: str, variables: dict[str, Any], field: str, message: str):
    template = Template("tpl_1", "t", "s", None, source, 0, 0)
    with pytest.raises(RenderError) as caught:
        render(template, variables)
    assert caught.value.field == field and message in str(caught.value)


def test_subject_with_a_line_break_is_refused():
    template = Template("tpl_1", "t", "{{ s }}", None, "x", 0, 0)
    with pytest.raises(RenderError, match="line break"):
        render(template, {"s": "a\nBcc: x@evil.test"})


def test_cli_push_list_show(tmp_path: Path, dns: DnsServer, server_cert: tuple[Path, Path]):
    config = write_config(tmp_path / "postroom.toml", settings_data(tmp_path, dns, 25, server_cert))
    postroom_cli(config, "init")
    source = tmp_path / "welcome.toml"
    source.write_text('name = "welcome"\nsubject = "Hi {{ name }}"\ntext = "Hello {{ name }}"\n')
    assert "created welcome" in postroom_cli(config, "templates", "push", str(source)).stdout
    source.write_text('name = "welcome"\nsubject = "Hey {{ name }}"\ntext = "Hello"\n')
    assert "replaced welcome" in postroom_cli(config, "templates", "push", str(source)).stdout
    [listed] = json.loads(postroom_cli(config, "templates", "list", "--json").stdout)
    shown = json.loads(postroom_cli(config, "templates", "show", "welcome", "--json").stdout)
    assert shown == listed and shown["subject"] == "Hey {{ name }}"
    source.write_text('name = "bad"\nsubject = "{{"\ntext = "x"\n')
    bad = postroom_cli(config, "templates", "push", str(source), check=False)
    assert bad.returncode == 1 and "subject" in bad.stderr and "Traceback" not in bad.stderr
