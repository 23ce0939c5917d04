"""The CLI facing a broken spool, a data_dir it cannot create, a taken port or a missing
certificate: one `postroom: …` line naming the file or setting, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import postroom_cli, write_config

SERVE_LISTENERS = {"smtp": {"listen": ["127.0.0.1:0"]}, "api": {"listen": "127.0.0.1:0"}}


def config_in(tmp_path: Path, **sections: dict[str, object]) -> Path:
    data: dict[str, dict[str, object]] = {"server": {"data_dir": str(tmp_path / "data")}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return write_config(tmp_path / "postroom.toml", data)


def assert_clear_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Exit 1, no traceback, and one `postroom: …` line holding every `expected` text."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("postroom: ")]
    for text in expected:
        assert text in line, line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


SPOOL_COMMANDS = [
    pytest.param(["queue", "list"], id="queue-list"),
    pytest.param(["keys", "create", "--name", "app"], id="keys-create"),
    pytest.param(["domains", "list"], id="domains-list"),
    pytest.param(["queue", "summary"], id="queue-summary"),
    pytest.param(["suppressions", "export"], id="suppressions-export"),
    pytest.param(["db", "migrate"], id="db-migrate"),
    pytest.param(["serve"], id="serve"),
]


@pytest.mark.parametrize("command", SPOOL_COMMANDS)
def test_a_file_that_is_not_a_spool_is_named(tmp_path: Path, command: list[str]):
    config = config_in(tmp_path, **SERVE_LISTENERS)
    spool = tmp_path / "data" / "spool.sqlite3"
    spool.parent.mkdir()
    spool.write_bytes(b"garbage, not SQLite " * 500)
    result = postroom_cli(config, *command, check=False)
    assert_clear_failure(result, f"cannot open the spool {spool}: file is not a database")
    assert spool.read_bytes() == b"garbage, not SQLite " * 500  # left as it was


@pytest.mark.parametrize("command", [["queue", "list"], ["db", "migrate"], ["serve"]])
def test_a_spool_that_cannot_be_opened_is_named(tmp_path: Path, command: list[str]):
    config = config_in(tmp_path, **SERVE_LISTENERS)
    spool = tmp_path / "data" / "spool.sqlite3"
    spool.mkdir(parents=True)  # unopenable whoever runs the test (root ignores modes)
    result = postroom_cli(config, *command, check=False)
    assert_clear_failure(result, f"cannot open the spool {spool}: unable to open database file")


def test_init_with_a_data_dir_that_cannot_be_created(tmp_path: Path):
    config = write_config(tmp_path / "postroom.toml", {"server": {"data_dir": "/proc/postroom"}})
    result = postroom_cli(config, "init", check=False)
    assert_clear_failure(result, "cannot create server.data_dir /proc/postroom")


def test_db_migrate_needs_an_existing_spool_and_init_creates_one(tmp_path: Path):
    config = config_in(tmp_path)
    spool = tmp_path / "data" / "spool.sqlite3"
    refused = postroom_cli(config, "db", "migrate", check=False)
    assert_clear_failure(refused, f"no spool at {spool}", "postroom init")
    assert not spool.exists()  # a wrong data_dir did not get a new, empty spool
    assert postroom_cli(config, "init").returncode == 0
    assert spool.exists()
    migrated = postroom_cli(config, "db", "migrate")
    assert migrated.stdout.strip() == "up to date"


def test_serve_with_the_api_port_taken(tmp_path: Path, taken_port: int):
    config = config_in(tmp_path, **SERVE_LISTENERS)
    postroom_cli(config, "init")
    config = config_in(tmp_path, smtp={"listen": ["127.0.0.1:0"]},
                       api={"listen": f"127.0.0.1:{taken_port}"})
    result = postroom_cli(config, "serve", check=False)
    assert_clear_failure(
        result, f"cannot start: api.listen 127.0.0.1:{taken_port}: address already in use"
    )


def test_serve_with_the_smtp_port_taken(tmp_path: Path, taken_port: int):
    config = config_in(tmp_path, **SERVE_LISTENERS)
    postroom_cli(config, "init")
    config = config_in(tmp_path, smtp={"listen": [f"127.0.0.1:{taken_port}"]},
                       api={"listen": "127.0.0.1:0"})
    result = postroom_cli(config, "serve", check=False)
    assert_clear_failure(
        result, f"cannot start: smtp.listen 127.0.0.1:{taken_port}: address already in use"
    )


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key"])
def test_serve_names_a_missing_certificate_file_and_its_setting(
    tmp_path: Path, server_cert: tuple[Path, Path], missing: str
):
    config = config_in(tmp_path, **SERVE_LISTENERS)
    postroom_cli(config, "init")
    cert, key = server_cert
    paths = {"tls_cert": str(cert), "tls_key": str(key), missing: str(tmp_path / "gone.pem")}
    config = config_in(tmp_path, smtp={"listen": ["127.0.0.1:0"], **paths},
                       api={"listen": "127.0.0.1:0"})
    result = postroom_cli(config, "serve", check=False)
    assert_clear_failure(
        result, f"cannot start: smtp.{missing} {tmp_path / 'gone.pem'}: No such file or directory"
    )
