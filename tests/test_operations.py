"""What a sysadmin installs and uses: the systemd unit, production config, reloads, sd_notify."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from config import Settings, load_settings
from relay.notify import Notifier
from relay.reload import Reloader, ReloadRefused, changes

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "postroom.service"


def directives(path: Path) -> dict[str, list[str]]:
    """`Section.Key` → values in order (systemd allows a key more than once)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def one(unit: dict[str, list[str]], key: str) -> str:
    [value] = unit[key]
    return value


def test_unit_is_notify_hardened_and_reloadable():
    unit = directives(UNIT)
    assert one(unit, "Service.Type") == "notify"
    assert one(unit, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service.Restart") == "on-failure"
    assert one(unit, "Service.WatchdogSec") == "30s"
    assert one(unit, "Service.User") == one(unit, "Service.Group") == "postroom"
    assert one(unit, "Service.ExecStart") == (
        "/opt/postroom/bin/postroom --config /etc/postroom/postroom.toml serve"
    )
    assert one(unit, "Service.StateDirectory") == "postroom"
    assert one(unit, "Service.ConfigurationDirectory") == "postroom"
    assert one(unit, "Service.AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(unit, "Service.CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectControlGroups", "RestrictRealtime"):
        assert one(unit, f"Service.{key}") == "yes", key
    assert one(unit, "Service.ProtectSystem") == "strict"
    # AF_UNIX: the journal and $NOTIFY_SOCKET need it.
    assert set(one(unit, "Service.RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX"
    }
    assert "@system-service" in unit["Service.SystemCallFilter"]
    # The stop timeout leaves room for the drain.
    stop = int(one(unit, "Service.TimeoutStopSec"))
    assert stop > Settings().server.shutdown_timeout
    assert stop > load_settings(ROOT / "config" / "production.toml").server.shutdown_timeout
    assert one(unit, "Install.WantedBy") == "multi-user.target"
    # Every SMTP session holds a descriptor, and delivery, webhooks and SQLite need more: the
    # default soft limit (1024) sits right at smtp.max_sessions.
    assert int(one(unit, "Service.LimitNOFILE")) == 65536
    assert 65536 > 10 * Settings().smtp.max_sessions
    # Nothing installs a local file to point at (pip does not install README.md).
    assert not any(d.startswith("file:") for d in unit.get("Unit.Documentation", []))


def test_sysusers_and_tmpfiles_match_the_unit():
    sysusers = (ROOT / "systemd" / "postroom.sysusers.conf").read_text()
    assert "\nu postroom - " in "\n" + sysusers
    tmpfiles = (ROOT / "systemd" / "postroom.tmpfiles.conf").read_text()
    assert "d /var/lib/postroom 0750 postroom postroom" in tmpfiles
    assert "d /etc/postroom 0750 root postroom" in tmpfiles
    # The README's backup command writes into a directory that must exist, for postroom only.
    readme = (ROOT / "README.md").read_text()
    assert "db backup /var/backups/postroom/" in readme
    assert "d /var/backups/postroom 0750 postroom postroom" in tmpfiles


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path):
    # verify checks that ExecStart exists: point it at a program that does, change nothing else.
    unit = tmp_path / "postroom.service"
    unit.write_text(UNIT.read_text().replace("/opt/postroom/bin/postroom", sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in result.stderr.splitlines() if "postroom.service" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_production_config_loads_with_587_and_the_install_paths():
    path = ROOT / "config" / "production.toml"
    settings = load_settings(path)
    assert settings.smtp.listen == ["0.0.0.0:587"]
    assert settings.server.data_dir == Path("/var/lib/postroom")
    assert settings.smtp.tls_cert == Path("/etc/postroom/tls/fullchain.pem")
    assert settings.api.listen == "127.0.0.1:8025"
    assert settings.smtp.tls_listen == ["0.0.0.0:465"]
    readme = (ROOT / "README.md").read_text()
    for text in ("/opt/postroom", "/etc/postroom/postroom.toml", "/var/lib/postroom",
                 "config/production.toml", "systemctl reload postroom"):
        assert text in readme, text


# -- reload plans ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        pytest.param({}, [], id="nothing"),
        pytest.param({"server": {"log_level": "DEBUG"}}, ["server.log_level (INFO → DEBUG)"],
                     id="level"),
        pytest.param({"smtp": {"trusted_networks": ["10.0.0.0/8"]}},
                     ["smtp.trusted_networks ([] → [10.0.0.0/8])"], id="list"),
        pytest.param({"api": {"key_hash_secret": "s3cret"}},
                     ["api.key_hash_secret (unset → (secret))"], id="secret-hidden"),
        pytest.param({"server": {"shutdown_timeout": "1m"}, "log": {"format": "json"}},
                     ["server.shutdown_timeout (30 → 60)", "log.format (text → json)"],
                     id="two"),
    ],
)
def test_changes_name_what_differs(new: dict[str, dict[str, object]], expected: list[str]):
    found = [str(c) for c in changes(Settings(), Settings(**new))]
    assert found == expected
    assert "s3cret" not in " ".join(found)


def test_every_hook_prepares_before_any_applies():
    calls: list[str] = []
    reloader = Reloader()
    reloader.register("first", ["server.log_level"],
                      lambda new: lambda: calls.append("apply first"))

    def refuse(new: Settings):
        calls.append("prepare second")
        raise ReloadRefused("no such route")

    reloader.register("second", [], refuse)
    with pytest.raises(ReloadRefused, match="second: no such route"):
        reloader.plan(Settings(), Settings(server={"log_level": "DEBUG"}))
    assert calls == ["prepare second"]

    plan = Reloader()
    plan.register("first", ["server.log_level"], lambda new: lambda: calls.append("applied"))
    result = plan.plan(Settings(), Settings(server={"log_level": "DEBUG"},
                                            smtp={"max_recipients": 5}))
    assert [c.key for c in result.live] == ["server.log_level"]
    assert [c.key for c in result.needs_restart] == ["smtp.max_recipients"]
    result.apply()
    assert calls[-1] == "applied"


# -- sd_notify -------------------------------------------------------------------------------


def test_notifier_sends_datagrams_and_reads_the_watchdog(tmp_path: Path):
    address = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        notifier = Notifier.from_environment(
            {"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "4000000"}
        )
        assert notifier.watchdog_interval == 2.0
        notifier.ready("serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"
        notifier.close()
    assert Notifier.from_environment({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
                                     ).watchdog_interval is None
    silent = Notifier.from_environment({})
    assert not silent.is_enabled
    silent.ready("nobody listens")  # does nothing, raises nothing
