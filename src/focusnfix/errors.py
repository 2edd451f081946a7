"""Errors that reach the user as one clear line (the CLI prints them and exits with status 2)."""

import sys


class InputError(ValueError):
    """Bad user input: a config field, a path, a prompt, an image, a mask or a weights file.

    The message names what is wrong and what was expected.
    """


class ConfigError(InputError):
    """A config file or ``--set`` override failed validation; the message names the field."""


def warn(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the run."""
    print(f"focusnfix: warning: {message}", file=sys.stderr, flush=True)
