"""Postroom configuration: the settings model and how to load it."""

from __future__ import annotations

from config.settings import (
    DEFAULT_CONFIG_PATH,
    EXAMPLE_CONFIG,
    ConfigError,
    EventLoop,
    RouteSettings,
    Settings,
    decode_key,
    load_settings,
    parse_address,
    parse_duration,
    parse_size,
    resolve_config_path,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXAMPLE_CONFIG",
    "ConfigError",
    "EventLoop",
    "RouteSettings",
    "Settings",
    "decode_key",
    "load_settings",
    "parse_address",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
]
