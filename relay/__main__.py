"""`python -m relay` runs the `postroom` CLI."""

from __future__ import annotations

from relay.cli import main

main()
