"""The `meissonic-edge` command. The top of the tree: it may import every other subpackage, none imports it."""

from meissonic_edge.cli.app import main

__all__ = ["main"]
