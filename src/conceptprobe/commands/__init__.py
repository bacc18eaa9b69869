"""CLI command groups, each registering its commands on the main typer app."""
