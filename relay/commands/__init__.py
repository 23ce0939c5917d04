"""The `postroom` commands, one module per command group; `relay.cli` adds them to the group."""
