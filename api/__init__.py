"""Postroom's HTTP front door: `create_app(spool, settings, readiness)` → a Starlette app.

The app is imported when first asked for, not with the package: the CLI's commands use the API's
models and errors, and the app's import (Starlette, the routes, the OpenAPI document) was a
fifth of every `postroom` command's start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app, create_public_app

__all__ = ["create_app", "create_public_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from api import app

        return getattr(app, name)
    raise AttributeError(f"module 'api' has no attribute {name!r}")
