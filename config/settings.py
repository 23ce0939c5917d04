"""Postroom's settings: one validated model per config section.

Owns where the configuration comes from (a TOML file, then `POSTROOM_<SECTION>__<KEY>` environment
overrides), how it is validated (unknown keys and bad values are errors naming `section.key`), and
the few value types every part shares: durations, byte sizes and `host:port` addresses. Everything
else receives a frozen `Settings` and never reads the environment itself.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

DEFAULT_CONFIG_PATH = Path("/etc/postroom/postroom.toml")
EXAMPLE_CONFIG = Path(__file__).with_name("example.toml")
ENV_PREFIX = "POSTROOM_"
#: `POSTROOM_*` variables that are not settings (`POSTROOM_CONFIG`: the config file's path).
NON_SETTING_VARIABLES = frozenset({"POSTROOM_CONFIG"})

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, None: 1,
}


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists `section.key: reason` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: object) -> float:
    """Seconds from an integer/float of seconds or a string such as "30s", "5m", "2h", "1d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"2h\" or \"1d\"")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 30, \"30s\", \"5m\", \"2h\" or \"1d\"")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as "50MB" or "10MiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        unit = m.group(2).lower() if m.group(2) else None
        return int(m.group(1)) * _SIZE_UNITS[unit]
    raise ValueError("expected a size in bytes or a string such as \"50MB\"")


def decode_key(text: str) -> bytes:
    """An encryption key from its base64 text: exactly 32 bytes (AES-256), else ValueError."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64: generate one with python -c 'import os,base64;"
                         "print(base64.b64encode(os.urandom(32)).decode())'") from None
    if len(key) != 32:
        raise ValueError(f"must be 32 bytes (AES-256), not {len(key)}")
    return key


def parse_address(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` → (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return (host or default_host, int(port))


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a \"host:port\" string")
    parse_address(value)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[str, BeforeValidator(_address)]


def _steps(value: list[float]) -> list[float]:
    if not value:
        raise ValueError("needs at least one step")
    return value


#: A retry schedule: the waits after each failed attempt, at least one.
Schedule = Annotated[list[Duration], AfterValidator(_steps)]


def _is_secret(annotation: Any) -> bool:
    return SecretStr in (annotation, *getattr(annotation, "__args__", ()))


class Section(BaseModel):
    """A config section: unknown keys are errors, and secrets may come from `<key>_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            file_key = f"{name}_file"
            if file_key not in data:
                continue
            if not _is_secret(field.annotation):
                continue
            path = Path(str(data.pop(file_key)))
            try:
                data[name] = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                # Raised with its own location, so the message names `section.<key>_file`
                # rather than the whole section this validator runs on.
                error = PydanticCustomError(
                    "secret_file", "cannot read {path}: {reason}",
                    {"path": str(path), "reason": exc.strerror or str(exc)},
                )
                raise ValidationError.from_exception_data(
                    cls.__name__, [{"type": error, "loc": (file_key,), "input": str(path)}]
                ) from None
        return data


#: `server.event_loop` (relay/eventloop.py).
EventLoop = Literal["auto", "uvloop", "asyncio"]


class ServerSettings(Section):
    data_dir: Path = Path("/var/lib/postroom")
    hostname: str = Field(default_factory=socket.getfqdn)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout: Duration = 30.0
    #: The service's and the SMTP workers' event loop (relay/eventloop.py): "auto" is uvloop when
    #: it is installed, else asyncio's.
    event_loop: EventLoop = "auto"


#: cgroup v2's CPU quota of this process's group (a container's `--cpus`, systemd's CPUQuota=).
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cpu_quota(path: Path = CPU_MAX) -> float | None:
    """The CPUs the cgroup quota allows (`quota period`, e.g. `150000 100000` → 1.5); None
    without a quota (`max …`) or without cgroup v2."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def auto_workers(quota: float | None = None) -> int:
    """`smtp.workers = "auto"`: one per core this process may run on beyond the first, up to 4.

    The cores are those of its CPU affinity, fewer if a cgroup quota allows fewer (a container
    limited to one CPU sees all the host's cores, and would otherwise start workers it cannot
    run). Four, because each worker costs ~53 MiB and the service process, which commits and
    delivers for all of them, is the limit well before that (bench/README.md: ~72% busy with one
    worker on 2 cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    allowed = cpu_quota() if quota is None else quota
    if allowed is not None:
        cores = min(cores, max(1, math.ceil(allowed)))
    return min(max(cores - 1, 0), 4)


class SmtpSettings(Section):
    listen: list[Address] = ["127.0.0.1:2525"]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    trusted_networks: list[str] = []
    max_message_size: ByteSize = 50 * 1000**2
    max_recipients: int = Field(default=100, ge=1)
    timeout: Duration = 300.0
    tls_listen: list[Address] = []
    allow_plaintext_auth_loopback: bool = False
    max_sessions: int = Field(default=1000, ge=1)
    max_sessions_per_ip: int = Field(default=100, ge=1)
    session_timeout: Duration = 3600.0
    auth_max_failures: int = Field(default=5, ge=1)
    auth_failure_window: Duration = 600.0
    auth_failure_delay: Duration = 1.0
    auth_lockout: Duration = 900.0
    #: SMTP worker processes (relay/workers.py); 0: the service process runs the sessions itself;
    #: "auto": one per core beyond the first (so none on one core), at most 4.
    workers: int | Literal["auto"] = "auto"
    #: A worker whose loop does not answer the service for this long is killed and replaced.
    worker_watchdog: Duration = Field(default=30.0, gt=0)

    @property
    def worker_count(self) -> int:
        """How many SMTP worker processes `postroom serve` runs."""
        return self.workers if isinstance(self.workers, int) else auto_workers()

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and 0 <= value <= 64):
            return value
        raise ValueError('a number of processes from 0 to 64, or "auto"')

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP network") from None
        return value


class ApiSettings(Section):
    listen: Address = "127.0.0.1:8025"
    max_request_size: ByteSize = 50 * 1000**2
    key_hash_secret: SecretStr | None = None
    idempotency_ttl: Duration = 86400.0
    max_batch: int = Field(default=10_000, ge=1)
    max_recipients_per_field: int = Field(default=50, ge=1)
    check_recipient_domains: bool = True
    recipient_domain_cache_size: int = Field(default=10_000, ge=1)
    # How long the service reuses what it read of a key and of a domain's default sender name
    # (store/recent.py), and how many of each it keeps. Its own writes take effect at once;
    # another process's (the CLI's) within this time.
    lookup_cache_ttl: Duration = 1.0
    lookup_cache_size: int = Field(default=4096, ge=1)
    # Requests per minute per API key (bursts up to the same number); 0: unlimited. A key's own
    # `--rate-limit` overrides it.
    rate_limit_per_minute: int = Field(default=0, ge=0)
    # Failed authentications per minute per client address; past it, 429 before any key lookup.
    auth_failures_per_minute: int = Field(default=30, ge=1)
    # The https base URL recipients reach the unsubscribe routes at (List-Unsubscribe links);
    # None: marketing mail gets no one-click List-Unsubscribe header.
    public_url: str | None = None
    # An optional second listener that serves only /unsubscribe/… (never the API or /metrics).
    public_listen: Address | None = None
    # Optional mailto: address offered in List-Unsubscribe beside the https link.
    unsubscribe_mailto: str | None = None
    # Serve `listen` in the SMTP worker processes (`smtp.workers`), beside their SMTP sessions,
    # rather than in the service's loop: requests are parsed, validated and composed there, and
    # the service is asked only for what it owns (keys and limits, the commit, the spool's
    # reads and writes). No effect without workers. `public_listen` is always the service's.
    in_workers: bool = True

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", value):
            raise ValueError("expected an http(s) base URL such as \"https://mail.example.com\"")
        return value.rstrip("/")


class RouteSettings(Section):
    """`[delivery.routes."example.com"]` (or `"*"`): send through a smarthost instead of MX."""

    host: str
    port: int = Field(default=587, ge=1, le=65535)
    tls: Literal["opportunistic", "required", "verify", "implicit"] = "required"
    username: str | None = None
    password: SecretStr | None = None


class DestinationSettings(Section):
    """`[delivery.destinations."gmail.com"]`: pacing for one destination domain."""

    max_connections: int | None = Field(default=None, ge=1)
    message_rate: float | None = Field(default=None, ge=0)


class DeliverySettings(Section):
    dns_nameservers: list[str] = []
    dns_timeout: Duration = 5.0
    mx_port: int = Field(default=25, ge=1, le=65535)
    retry_schedule: Schedule = [30.0, 300.0, 1800.0, 7200.0, 18000.0]
    max_connections: int = Field(default=100, ge=1)
    max_connections_per_destination: int = Field(default=10, ge=1)
    claim_batch: int = Field(default=100, ge=1)
    lease: Duration = 1200.0
    poll_interval: Duration = 1.0
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    attempt_timeout: Duration = 900.0
    max_age: Duration = 5 * 86400.0
    allow_private_mx: bool = True
    tls: Literal["opportunistic", "required", "verify"] = "opportunistic"
    tls_ca_file: Path | None = None
    source_address: str | None = None
    return_path: str | None = None
    key_cache_ttl: Duration = 60.0
    message_rate: float = Field(default=0.0, ge=0)
    destination_backoff: Duration = 30.0
    routes: dict[str, RouteSettings] = {}
    destinations: dict[str, DestinationSettings] = {}
    # An SMTP session that ended cleanly stays open for further messages to the same host, up
    # to this many messages in all (1: a new connection for every message).
    connection_reuse_limit: int = Field(default=100, ge=1)
    # ... and is closed when no message needed it for this long (Postfix: 2s as well).
    connection_idle_timeout: Duration = 2.0
    # Units overdue by more than this are claimed oldest first beside the priority order, so
    # high-priority mail never starves normal and low.
    priority_aging: Duration = 300.0
    # Send a DSN (RFC 3464) to the envelope sender of SMTP-submitted mail that bounced or failed.
    bounce_messages: bool = False

    @field_validator("source_address")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("routes", "destinations")
    @classmethod
    def _lower_domains(cls, value: dict[str, Any]) -> dict[str, Any]:
        return {k.rstrip(".").lower(): v for k, v in value.items()}

    def route_for(self, domain: str) -> RouteSettings | None:
        """The smarthost route for a recipient domain: its own, else `"*"`, else None (MX)."""
        return self.routes.get(domain) or self.routes.get("*")

    def destination(self, domain: str) -> DestinationSettings:
        """Pacing for one destination: its overrides over the delivery-wide values."""
        override = self.destinations.get(domain)
        return DestinationSettings(
            max_connections=(
                override.max_connections
                if override and override.max_connections is not None
                else self.max_connections_per_destination
            ),
            message_rate=(
                override.message_rate
                if override and override.message_rate is not None
                else self.message_rate
            ),
        )

    @property
    def nameserver_addresses(self) -> list[tuple[str, int]]:
        """`dns_nameservers` as (host, port), port 53 by default; empty: the system's."""
        # Shared by delivery's MX resolver and the API's recipient-domain check, so both ask
        # the same servers.
        return [parse_address(s if ":" in s else f"{s}:53") for s in self.dns_nameservers]

    @model_validator(mode="after")
    def _lease_covers_attempt(self) -> DeliverySettings:
        # A lease shorter than an attempt would let a live process claim a unit twice.
        if self.lease <= self.attempt_timeout:
            raise ValueError(
                f"lease ({self.lease:g}s) must exceed attempt_timeout ({self.attempt_timeout:g}s)"
            )
        return self


class StorageSettings(Section):
    commit_batch: int = Field(default=512, ge=1)
    busy_timeout: Duration = 10.0
    # AES-256-GCM at rest for message bodies and DKIM private keys: base64 of 32 random bytes.
    encryption_key: SecretStr | None = None
    # The key before a rotation: still opens what it sealed until `postroom db rotate-key` ends.
    previous_encryption_key: SecretStr | None = None

    @field_validator("encryption_key", "previous_encryption_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            decode_key(value.get_secret_value())
        return value


class WebhookSettings(Section):
    # Webhook URLs resolving to loopback, link-local or private addresses are refused unless
    # this is on (sidecar setups where the app lives on the same host or LAN).
    allow_private_networks: bool = False
    # Waits after each failed attempt (the first attempt is immediate); after the last, give up.
    retry_schedule: Schedule = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
    retry_jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    timeout: Duration = 10.0
    max_concurrency: int = Field(default=50, ge=1)
    max_concurrency_per_endpoint: int = Field(default=4, ge=1)
    claim_batch: int = Field(default=100, ge=1)
    lease: Duration = 60.0
    poll_interval: Duration = 1.0
    secret_rotation_overlap: Duration = 86400.0
    replay_limit: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _lease_covers_attempt(self) -> WebhookSettings:
        if self.lease <= self.timeout:
            raise ValueError(
                f"lease ({self.lease:g}s) must exceed timeout ({self.timeout:g}s)"
            )
        return self


class EventSettings(Section):
    # How often the event stream looks for new events when no commit wakes it.
    stream_poll_interval: Duration = 1.0
    # A comment line keeps idle streams open through proxies.
    stream_keepalive: Duration = 15.0


class LogSettings(Section):
    format: Literal["text", "json"] = "text"


class RetentionSettings(Section):
    """The data lifecycle: how long bodies and the rest of a finished message are kept."""

    # Bodies of finished messages older than this are removed (0: keep them).
    content_days: float = Field(default=30.0, ge=0)
    # Finished messages with their recipients and events, and any event, webhook attempt or
    # idempotency key older than this are removed (0: keep them).
    metadata_days: float = Field(default=90.0, ge=0)
    # false: a message's body is removed as soon as every recipient is final.
    store_content: bool = True
    # How often the sweep runs, how many rows one batch (one short write) touches, and the pause
    # between batches that leaves the spool to intake and delivery.
    interval: Duration = 600.0
    batch_size: int = Field(default=500, ge=1)
    batch_pause: Duration = 0.05


class PolicySettings(Section):
    # Accept mail whose From: domain was never added with `postroom domains add` (it goes out
    # unsigned). Off in production: only your own, DKIM-signed domains send.
    allow_unconfigured_domains: bool = False


class Settings(BaseSettings):
    """Every setting, by section; `config_path` is where the file was (or would be) read."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )
    sections: ClassVar[tuple[str, ...]] = (
        "server", "smtp", "api", "delivery", "storage", "webhooks", "events", "log",
        "retention", "policy",
    )

    server: ServerSettings = ServerSettings()
    smtp: SmtpSettings = SmtpSettings()
    api: ApiSettings = ApiSettings()
    delivery: DeliverySettings = DeliverySettings()
    storage: StorageSettings = StorageSettings()
    webhooks: WebhookSettings = WebhookSettings()
    events: EventSettings = EventSettings()
    log: LogSettings = LogSettings()
    retention: RetentionSettings = RetentionSettings()
    policy: PolicySettings = PolicySettings()
    config_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file; the file arrives as init arguments.
        return (env_settings, init_settings)

    @property
    def spool_path(self) -> Path:
        return self.server.data_dir / "spool.sqlite3"

    @property
    def tls_dir(self) -> Path:
        return self.server.data_dir / "tls"


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> tuple[Path, bool]:
    """The config path by precedence, and whether it was asked for explicitly."""
    if explicit:
        return Path(explicit), True
    if env := os.environ.get("POSTROOM_CONFIG"):
        return Path(env), True
    local = Path("postroom.toml")
    if local.is_file():
        return local, False
    return DEFAULT_CONFIG_PATH, False


def load_settings(
    path: str | os.PathLike[str] | None = None, *, must_exist: bool | None = None
) -> Settings:
    """Read the config file (if any) and the environment; raise ConfigError on any problem."""
    config_path, explicit = resolve_config_path(path)
    must_exist = explicit if must_exist is None else must_exist
    data: dict[str, Any] = {}
    if config_path.is_file():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{config_path}: cannot read: {exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{config_path}: not valid TOML: {exc}"]) from None
    elif must_exist:
        raise ConfigError([f"{config_path}: no such config file"])
    if problems := check_environment(os.environ):
        raise ConfigError(problems)
    try:
        settings = Settings(**data, config_path=config_path.resolve())
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()]) from None
    except SettingsError as exc:  # what check_environment did not foresee, still no traceback
        raise ConfigError([f"environment: {exc}"]) from None
    data_dir = settings.server.data_dir
    if not data_dir.is_absolute():
        # A relative data_dir is relative to the config file, not to the working directory.
        server = settings.server.model_copy(
            update={"data_dir": (config_path.resolve().parent / data_dir).resolve()}
        )
        settings = settings.model_copy(update={"server": server})
    return settings


def check_environment(environ: Mapping[str, str]) -> list[str]:
    """Problems with the `POSTROOM_<SECTION>__<KEY>` variables, as `section.key: reason`.

    pydantic-settings ignores variables naming no section (a typo would silently change
    nothing) and reports a list or table that is not JSON without saying which key: both are
    found here, before it reads them. Other bad values are left to validation.
    """
    problems = []
    for var, value in sorted(environ.items()):
        upper = var.upper()  # names match case-insensitively, as pydantic-settings reads them
        if not upper.startswith(ENV_PREFIX) or upper in NON_SETTING_VARIABLES:
            continue
        parts = upper.removeprefix(ENV_PREFIX).lower().split("__")
        key = ".".join(parts)
        annotation = _env_target(parts)
        if annotation is None:
            problems.append(f"{key}: unknown setting (from {var})")
        elif _is_complex(annotation):
            try:
                json.loads(value)
            except ValueError as exc:
                problems.append(
                    f"{key}: {var} is not valid JSON ({exc}); lists and tables are JSON in "
                    "the environment, e.g. '[\"10.0.0.0/8\"]'"
                )
    return problems


def _env_target(parts: list[str]) -> Any:
    """The type a variable's key path names, or None if it names no setting."""
    if parts[0] not in Settings.sections:
        return None
    target: Any = Settings.model_fields[parts[0]].annotation
    for part in parts[1:]:
        target = _unwrap(target)
        if isinstance(target, type) and issubclass(target, BaseModel):
            field = target.model_fields.get(part)
            secret = target.model_fields.get(part.removesuffix("_file"))
            if field is not None:
                target = field.annotation
            elif part.endswith("_file") and secret is not None and _is_secret(secret.annotation):
                target = str  # the path of a file holding the secret
            else:
                return None
        elif typing.get_origin(target) is dict:
            target = typing.get_args(target)[1]  # any key: a route's or destination's domain
        else:
            return None
    return target


def _unwrap(annotation: Any) -> Any:
    """`X` from `Annotated[X, …]` and `X | None`."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _is_complex(annotation: Any) -> bool:
    """Whether pydantic-settings reads this type from the environment as JSON."""
    target = _unwrap(annotation)
    if isinstance(target, type) and issubclass(target, BaseModel):
        return True
    return typing.get_origin(target) in (list, dict, tuple, set, frozenset)


def _describe(err: Any) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    loc = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", loc)
    reason = str(err["msg"])
    if err["type"] == "extra_forbidden":
        reason = "unknown setting"
    reason = reason.removeprefix("Value error, ")
    return f"{loc or 'config'}: {reason}"
