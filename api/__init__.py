"""Postroom's HTTP front door: `create_app(spool, settings, readiness)` → a Starlette app."""

from __future__ import annotations

from api.app import create_app, create_public_app

__all__ = ["create_app", "create_public_app"]
