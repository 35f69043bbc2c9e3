"""What every subcommand's parser shares: one-line usage errors and the argument types."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: ...`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
