"""Settings: durations, sizes, precedence, errors that name the field, and the example file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import EXAMPLE_CONFIG, ConfigError, Settings, load_settings, parse_duration, parse_size
from config.settings import auto_workers, cpu_quota


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
     ("250ms", 0.25), (1.5, 1.5)],
)
def test_durations(value: object, seconds: float):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 fortnights", "", "-1s", True, None, "1w"])
def test_bad_durations(value: object):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"), [(1000, 1000), ("50MB", 50_000_000), ("10MiB", 10 * 2**20), ("7", 7)]
)
def test_sizes(value: object, size: int):
    assert parse_size(value) == size


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = tmp_path / "postroom.toml"
    config.write_text('[smtp]\nlisten = ["127.0.0.1:2525"]\n[delivery]\nmx_port = 2526\n')
    monkeypatch.setenv("POSTROOM_SMTP__LISTEN", '["127.0.0.1:2600", "[::1]:2600"]')
    monkeypatch.setenv("POSTROOM_DELIVERY__RETRY_SCHEDULE", '["1m", 120]')
    settings = load_settings(config)
    assert settings.smtp.listen == ["127.0.0.1:2600", "[::1]:2600"]
    assert settings.delivery.retry_schedule == [60.0, 120.0]
    assert settings.delivery.mx_port == 2526


def test_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env_config = tmp_path / "env.toml"
    env_config.write_text("[delivery]\nmx_port = 1001\n")
    local = tmp_path / "postroom.toml"
    local.write_text("[delivery]\nmx_port = 1002\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POSTROOM_CONFIG", raising=False)
    assert load_settings().delivery.mx_port == 1002
    monkeypatch.setenv("POSTROOM_CONFIG", str(env_config))
    assert load_settings().delivery.mx_port == 1001
    explicit = tmp_path / "explicit.toml"
    explicit.write_text("[delivery]\nmx_port = 1003\n")
    assert load_settings(explicit).delivery.mx_port == 1003


def test_relative_data_dir_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "postroom.toml"
    config.write_text('[server]\ndata_dir = "../var/postroom"\n')
    monkeypatch.chdir("/")
    assert load_settings(config).server.data_dir == tmp_path / "var" / "postroom"


def test_errors_name_every_bad_field(tmp_path: Path):
    config = tmp_path / "postroom.toml"
    config.write_text(
        '[smtp]\nlisten = ["nowhere"]\ntrusted_networks = ["10.0.0.0/33"]\n'
        "[delivery]\nmx_port = 70000\nsurprise = 1\n[nonsense]\nx = 1\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config)
    problems = "\n".join(excinfo.value.problems)
    for field in ("smtp.listen[0]", "smtp.trusted_networks", "delivery.mx_port",
                  "delivery.surprise: unknown setting", "nonsense: unknown setting"):
        assert field in problems


def test_secret_from_file(tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    settings = Settings(api={"key_hash_secret_file": str(secret)})
    assert settings.api.key_hash_secret is not None
    assert settings.api.key_hash_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api={"key_hash_secret_file": str(tmp_path / "missing")})


def run_cli(
    cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """The real `postroom` in a child process, with only the given POSTROOM_* variables."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("POSTROOM_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=cwd, env=base | env,
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        pytest.param("POSTROOM_SMTP__LISTEN", "notjson", "smtp.listen: ", id="list-not-json"),
        pytest.param("POSTROOM_SMTP__TRUSTED_NETWORKS", '["10.0.0.0/8"', "smtp.trusted_networks: ",
                     id="list-cut-short"),
        pytest.param("POSTROOM_SMTP", "{", "smtp: ", id="section-not-json"),
        pytest.param("POSTROOM_SMPT__LISTEN", '["127.0.0.1:25"]',
                     "smpt.listen: unknown setting", id="unknown-section"),
        pytest.param("POSTROOM_SMTP__UNKNOWNKEY", "1", "smtp.unknownkey: unknown setting",
                     id="unknown-key"),
        pytest.param("POSTROOM_CONFIG_PATH", "/tmp/x", "config_path: unknown setting",
                     id="not-a-setting"),
    ],
)
def test_bad_environment_exits_2_naming_the_key(
    tmp_path: Path, variable: str, value: str, expected: str
):
    config = tmp_path / "ok.toml"
    config.write_text('[server]\ndata_dir = "data"\n')
    result = run_cli(tmp_path, {variable: value}, "--config", str(config), "keys", "list")
    assert result.returncode == 2, result.stderr
    assert f"postroom: config: {expected}" in result.stderr
    assert variable in result.stderr  # where to look
    assert "Traceback" not in result.stderr + result.stdout


def test_unreadable_secret_file_names_the_key(tmp_path: Path):
    config = tmp_path / "ok.toml"
    config.write_text(f'[api]\nkey_hash_secret_file = "{tmp_path / "missing"}"\n')
    result = run_cli(tmp_path, {}, "--config", str(config), "keys", "list")
    assert result.returncode == 2
    assert "postroom: config: api.key_hash_secret_file: cannot read " in result.stderr
    assert "Traceback" not in result.stderr


def test_config_path_and_secret_file_variables_still_work(tmp_path: Path):
    config = tmp_path / "elsewhere.toml"
    config.write_text('[server]\ndata_dir = "data"\n')
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    env = {
        "POSTROOM_CONFIG": str(config),
        "POSTROOM_API__KEY_HASH_SECRET_FILE": str(secret),
        "POSTROOM_DELIVERY__ROUTES__EXAMPLE.COM__HOST": "smarthost.example.net",
    }
    assert run_cli(tmp_path, env, "init").returncode == 0
    created = run_cli(tmp_path, env, "keys", "create", "--name", "app")
    assert created.returncode == 0, created.stderr
    assert (tmp_path / "data" / "spool.sqlite3").exists()  # the config POSTROOM_CONFIG named
    listed = run_cli(tmp_path, env, "keys", "list")
    assert listed.returncode == 0 and "app" in listed.stdout


def test_lease_must_outlast_an_attempt():
    with pytest.raises(ValueError, match="lease"):
        Settings(delivery={"lease": "1m", "attempt_timeout": "5m"})


def test_example_config_documents_every_field_with_its_default():
    text = EXAMPLE_CONFIG.read_text()
    example = load_settings(EXAMPLE_CONFIG)
    defaults = Settings()
    for section in Settings.sections:
        block = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        model = getattr(defaults, section)
        for name in type(model).model_fields:
            assert re.search(rf"^#? ?{name} = ", block, re.MULTILINE), f"{section}.{name}"
        if section != "server":
            assert getattr(example, section) == model, section


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (3, 3), ("auto", None)])
def test_smtp_workers_is_a_count_or_auto(value: object, expected: int | None):
    smtp = Settings(smtp={"workers": value}).smtp
    cores = len(os.sched_getaffinity(0))
    assert smtp.worker_count == (min(max(cores - 1, 0), 4) if expected is None else expected)


def test_bad_smtp_workers_is_named(tmp_path: Path):
    config = tmp_path / "postroom.toml"
    config.write_text('[smtp]\nworkers = "many"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_settings(config)
    assert any(p.startswith("smtp.workers") for p in excinfo.value.problems)
    config.write_text("[smtp]\nworkers = -1\n")
    with pytest.raises(ConfigError, match=r"smtp\.workers"):
        load_settings(config)


@pytest.mark.parametrize(("text", "cpus"), [
    ("150000 100000\n", 1.5), ("100000 100000", 1.0), ("max 100000\n", None), ("", None),
])
def test_a_cgroup_cpu_quota_is_read(tmp_path: Path, text: str, cpus: float | None):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    assert cpu_quota(cpu_max) == cpus
    assert cpu_quota(tmp_path / "absent") is None


def test_auto_workers_follow_a_cpu_quota_below_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert auto_workers(quota=1.0) == 0  # a container limited to one CPU: no workers
    assert auto_workers(quota=1.5) == min(max(min(cores, 2) - 1, 0), 4)
    assert auto_workers(quota=64.0) == min(max(cores - 1, 0), 4)
