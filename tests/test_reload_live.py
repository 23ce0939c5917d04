"""SIGHUP takes on routes, pacing and webhook settings without a restart."""

from __future__ import annotations

from pathlib import Path

from config import load_settings
from store import RecipientStatus, Source, Submission
from tests.conftest import settings_data, start_postroom, write_config
from tests.support import DnsServer, MxSink, wait_until

CONTENT = b"From: app@acme.test\r\nSubject: routed\r\n\r\nbody\r\n"


async def test_reload_applies_a_new_route_to_the_next_attempt(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, caplog
):
    config = write_config(tmp_path / "postroom.toml", settings_data(tmp_path, dns, mx_sink.port,
                                                                   server_cert))
    running = await start_postroom(load_settings(config))
    try:
        # routed.test has no DNS at all: only a route can deliver its mail.
        config.write_text(
            config.read_text()
            + f'\n[delivery.routes."routed.test"]\nhost = "127.0.0.1"\nport = {mx_sink.port}\n'
            + 'tls = "opportunistic"\n'
            + '\n[webhooks]\nretry_jitter = 0.2\n'
        )
        caplog.set_level("INFO", logger="relay.service")
        assert await running.service.reload()
        assert "delivery.routes" in caplog.text
        assert "only applied at the next restart" not in caplog.text

        accepted = await running.spool.accept(
            Submission("app@acme.test", ("user@routed.test",), CONTENT, Source.API)
        )
        [received] = await mx_sink.wait_for_messages(1)
        assert received.rcpt_tos == ["user@routed.test"]

        async def delivered() -> bool:
            message = await running.spool.get_message(accepted.id)
            return message.recipients[0].status is RecipientStatus.DELIVERED

        await wait_until(delivered, message="the routed message was not delivered")
    finally:
        await running.stop()
