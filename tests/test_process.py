"""Postroom as an operator runs it: the CLI and `postroom serve` as a separate process."""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
from pathlib import Path

import httpx
import pytest

from tests.conftest import postroom_cli, settings_data, spawn_postroom, write_config
from tests.support import DnsServer, MxSink, wait_until

pytestmark = pytest.mark.slow


def config_for(tmp_path: Path, dns: DnsServer, mx_port: int, server_cert, **smtp) -> Path:
    data = settings_data(tmp_path, dns, mx_port, server_cert)
    data["smtp"].update(smtp)
    return write_config(tmp_path / "postroom.toml", data)


def test_init_is_safe_to_run_twice_and_makes_spool_and_certificate(tmp_path: Path):
    config = tmp_path / "etc" / "postroom.toml"
    first = postroom_cli(config, "init", "--data-dir", "../var")
    assert "wrote" in first.stdout
    assert config.exists()
    data_dir = tmp_path / "var"
    assert (data_dir / "spool.sqlite3").exists()
    assert (data_dir / "tls" / "cert.pem").exists()
    assert (data_dir / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    config_text = config.read_text()
    cert = (data_dir / "tls" / "cert.pem").read_bytes()

    second = postroom_cli(config, "init")
    assert "kept" in second.stdout and "up to date" in second.stdout
    assert config.read_text() == config_text
    assert (data_dir / "tls" / "cert.pem").read_bytes() == cert
    ssl.create_default_context().load_verify_locations(data_dir / "tls" / "cert.pem")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[smtp]\nlisten = [\"nowhere\"]\n", "smtp.listen[0]: "),
        ("[smtp]\nlisten = [\"127.0.0.1:0\"]\nlistne = 1\n", "smtp.listne: unknown setting"),
        ("[delivery]\nretry_schedule = [\"5 fortnights\"]\n", "delivery.retry_schedule[0]: "),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, toml: str, expected: str):
    config = tmp_path / "postroom.toml"
    config.write_text(toml)
    result = postroom_cli(config, "serve", check=False)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_explicit_config_is_an_error(tmp_path: Path):
    result = postroom_cli(tmp_path / "nope.toml", "keys", "list", check=False)
    assert result.returncode == 2
    assert "no such config file" in result.stderr


def test_keys_create_list_revoke(tmp_path: Path):
    config = tmp_path / "postroom.toml"
    postroom_cli(config, "init", "--data-dir", "var")
    created = json.loads(postroom_cli(config, "keys", "create", "--name", "app", "--json").stdout)
    assert created["id"].startswith("key_") and created["key"].startswith("pr_")
    listed = json.loads(postroom_cli(config, "keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [created["id"]]
    assert created["key"] not in json.dumps(listed)  # the secret is shown once only
    assert created["key"] not in (tmp_path / "var" / "spool.sqlite3").read_bytes().decode("latin1")
    postroom_cli(config, "keys", "revoke", created["id"])
    listed = json.loads(postroom_cli(config, "keys", "list", "--json").stdout)
    assert listed[0]["revoked_at"] is not None
    missing = postroom_cli(config, "keys", "revoke", "key_nope", check=False)
    assert missing.returncode == 1 and "no API key key_nope" in missing.stderr


async def test_sigkill_after_ack_loses_nothing(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, client_tls: ssl.SSLContext
):
    # First run: MX port 1 answers nothing, so nothing can be delivered before the kill.
    config = config_for(tmp_path, dns, 1, server_cert)
    await asyncio.to_thread(postroom_cli, config, "init")
    created = await asyncio.to_thread(
        postroom_cli, config, "keys", "create", "--name", "t", "--json"
    )
    key = json.loads(created.stdout)["key"]
    proc = await asyncio.to_thread(spawn_postroom, config)
    ids = []
    try:
        async with httpx.AsyncClient(base_url=proc.api_url, timeout=10) as http:
            for i in range(5):
                response = await http.post(
                    "/v1/messages",
                    headers={"Authorization": f"Bearer {key}"},
                    json={"from": "app@acme.test", "to": f"http{i}@example.test",
                          "subject": f"http {i}", "text": "hello"},
                )
                assert response.status_code == 202
                ids.append(response.json()["id"])

        def smtp_send(i: int) -> str:
            with smtplib.SMTP("127.0.0.1", proc.smtp_port, timeout=10) as client:
                client.starttls(context=client_tls)
                client.login("app", key)
                client.mail("app@acme.test")
                client.rcpt(f"smtp{i}@example.test")
                code, reply = client.data(b"Subject: smtp\r\n\r\nhello\r\n")
                assert code == 250
                return reply.decode().rsplit(" ", 1)[1]

        for i in range(5):
            ids.append(await asyncio.to_thread(smtp_send, i))
    finally:
        proc.kill()  # SIGKILL right after the acknowledgements

    # Second run, pointed at the real MX: every acknowledged message arrives.
    config = config_for(tmp_path, dns, mx_sink.port, server_cert)
    proc = await asyncio.to_thread(spawn_postroom, config)
    try:
        received = await mx_sink.wait_for_messages(10, timeout=30)
        assert sorted(r.rcpt_tos[0] for r in received) == sorted(
            [f"http{i}@example.test" for i in range(5)]
            + [f"smtp{i}@example.test" for i in range(5)]
        )
        async with httpx.AsyncClient(base_url=proc.api_url, timeout=10) as http:

            async def all_delivered() -> bool:
                for message_id in ids:
                    response = await http.get(
                        f"/v1/messages/{message_id}", headers={"Authorization": f"Bearer {key}"}
                    )
                    if response.json()["status"] != "delivered":
                        return False
                return True

            await wait_until(all_delivered, timeout=15, message="not all shown as delivered")
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0  # SIGTERM: a clean exit

    # The CLI shows the same shape as the API.
    shown = await asyncio.to_thread(postroom_cli, config, "queue", "show", ids[0], "--json")
    message = json.loads(shown.stdout)
    assert set(message) == {"id", "status", "created_at", "from", "subject", "recipients",
                            "events", "tags", "metadata", "message_type", "priority",
                            "scheduled_at", "test"}
    assert message["status"] == "delivered"
    listed = await asyncio.to_thread(
        postroom_cli, config, "queue", "list", "--status", "delivered", "--json"
    )
    assert len(json.loads(listed.stdout)) == 10


def test_keys_create_with_sender_domains(tmp_path: Path):
    config = write_config(tmp_path / "postroom.toml", {"server": {"data_dir": "var"}})
    postroom_cli(config, "init", "--data-dir", "var")
    created = json.loads(postroom_cli(
        config, "keys", "create", "--name", "shop", "--sender-domain", "Shop.test",
        "--sender-domain", "bücher.test", "--json",
    ).stdout)
    assert created["sender_domains"] == ["shop.test", "xn--bcher-kva.test"]
    [listed] = json.loads(postroom_cli(config, "keys", "list", "--json").stdout)
    assert listed["sender_domains"] == ["shop.test", "xn--bcher-kva.test"]
    bad = postroom_cli(config, "keys", "create", "--name", "x", "--sender-domain", "a..b",
                       check=False)
    assert bad.returncode == 1 and "--sender-domain" in bad.stderr and "Traceback" not in bad.stderr
