"""Subcommands of the `remediator` CLI, one module each."""
