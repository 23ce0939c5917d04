"""Meta-tests that keep the house's shape: SQL only in store/, import direction, our own tree."""

from __future__ import annotations

import ast
from pathlib import Path

import api
import config
import relay
import store

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("relay", "api", "store", "config")


def imports_of(package: str) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def test_imports_resolve_to_this_tree():
    for module in (api, config, relay, store):
        assert module.__file__ is not None
        assert Path(module.__file__).resolve().is_relative_to(ROOT)


def test_sqlite_only_in_store():
    for package in ("relay", "api", "config"):
        for path, names in imports_of(package).items():
            assert not names & {"sqlite3", "aiosqlite"}, path


def test_dependency_direction():
    allowed = {
        "store": {"config"},
        "config": set(),
        "api": {"store", "config"},
        "relay": {"store", "config"},
    }
    # The service, the worker process (which serves the API with `api.in_workers`) and the CLI
    # (cli.py and its command modules) are the only relay code on api.
    exceptions = {
        ROOT / "relay" / "service.py", ROOT / "relay" / "worker.py", ROOT / "relay" / "cli.py"
    }
    for package in PACKAGES:
        for path, names in imports_of(package).items():
            ours = (names & set(PACKAGES)) - {package}
            if path in exceptions or path.parent == ROOT / "relay" / "commands":
                continue
            assert ours <= allowed[package], f"{path.relative_to(ROOT)} imports {ours}"


def test_every_event_type_is_documented_in_readme():
    readme = (ROOT / "README.md").read_text()
    for event in store.EventType:
        assert f"`{event.value}`" in readme, event.value


def loaded_by(module: str, names: set[str]) -> list[str]:
    """Which of `names` a fresh interpreter has in `sys.modules` once it imported `module`."""
    import subprocess
    import sys

    found = subprocess.run(
        [
            sys.executable, "-c",
            f"import sys, {module}; print(sorted(set(sys.modules) & set({sorted(names)!r})))",
        ],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    return list(ast.literal_eval(found))


def test_worker_process_does_not_load_the_crypto_libraries():
    # A worker process (SMTP and API) signs nothing and, without encryption at rest, seals
    # nothing: `cryptography` and dkimpy would add ~11 MiB to its RSS (bench/memory.py), so they
    # are imported where they are used (store/crypto.py, relay/domains.py).
    assert loaded_by("relay.worker", {"cryptography", "dkim"}) == []


def test_the_cli_loads_the_service_and_the_api_app_only_for_the_commands_that_run_them():
    # Every `postroom` command started by importing the service, the doctor, the API app and
    # the webhook dispatcher (httpx): ~1.6 s of imports before `keys list` could begin. `serve`,
    # `doctor`, `init` and `webhooks add/test` import what they run themselves.
    heavy = {"relay.service", "relay.doctor", "relay.webhooks", "api.app"}
    assert loaded_by("relay.cli", heavy) == []
