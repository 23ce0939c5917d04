"""`server.event_loop`: the service and its SMTP workers run on the loop it names.

The rest of the suite runs the in-process Postroom on uvloop, the default's choice where it is
installed (conftest.py); here `postroom serve` runs as a process on each loop, with a worker.
"""

from __future__ import annotations

import asyncio
import smtplib
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from config import ConfigError, load_settings
from relay.cli import cli
from tests.conftest import postroom_cli, settings_data, spawn_postroom, write_config
from tests.support import DnsServer, MxSink

MESSAGE = b"From: cron@acme.test\r\nTo: user@example.test\r\nSubject: loop\r\n\r\nhi\r\n"


def has_uvloop(pid: int) -> bool:
    """Whether process `pid` has uvloop's extension module loaded."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


def relay_one(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("cron@acme.test", ["user@example.test"], MESSAGE)


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
async def test_serve_and_its_workers_run_on_the_loop_the_setting_names(
    tmp_path: Path, dns: DnsServer, mx_sink: MxSink, server_cert, event_loop: str
):
    data = settings_data(tmp_path, dns, mx_sink.port, server_cert)
    data["server"]["event_loop"] = event_loop
    data["smtp"].update(workers=1, trusted_networks=["127.0.0.0/8"])
    config = write_config(tmp_path / "postroom.toml", data)
    await asyncio.to_thread(postroom_cli, config, "init")
    proc = await asyncio.to_thread(spawn_postroom, config)
    try:
        [ready] = [line for line in proc.output if "postroom ready:" in line]
        assert f" loop={event_loop} " in ready
        worker = int(ready.rsplit("smtp_workers=", 1)[1])
        assert has_uvloop(proc.proc.pid) is (event_loop == "uvloop")
        assert has_uvloop(worker) is (event_loop == "uvloop")
        await asyncio.to_thread(relay_one, proc.smtp_port)
        [received] = await mx_sink.wait_for_messages(1)
        assert received.rcpt_tos == ["user@example.test"]
    finally:
        assert await asyncio.to_thread(proc.terminate) == 0


def test_uvloop_required_where_it_is_missing_is_a_clear_start_up_error(
    tmp_path: Path, dns: DnsServer, server_cert, monkeypatch: pytest.MonkeyPatch
):
    data = settings_data(tmp_path, dns, 25, server_cert)
    data["server"]["event_loop"] = "uvloop"
    config = write_config(tmp_path / "postroom.toml", data)
    assert CliRunner().invoke(cli, ["--config", str(config), "init"], obj={}).exit_code == 0
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    result = CliRunner().invoke(cli, ["--config", str(config), "serve"], obj={})
    assert result.exit_code != 0
    assert 'server.event_loop = "uvloop", but uvloop is not installed' in result.output
    assert "Traceback" not in result.output


def test_an_unknown_event_loop_is_refused_with_the_choices(tmp_path: Path):
    config = tmp_path / "postroom.toml"
    config.write_text('[server]\nevent_loop = "tokio"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    [problem] = refused.value.problems
    assert "server.event_loop" in problem
    assert "'auto', 'uvloop' or 'asyncio'" in problem
