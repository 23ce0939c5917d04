"""Postroom's mail side: SMTP submission, the delivery engine, the service and the CLI."""

from __future__ import annotations

__version__ = "0.1.0"
