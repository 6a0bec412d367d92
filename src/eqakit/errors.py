"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a corrupt frame) is raised as one of
these; the CLI prints the message without a traceback and exits with the error's code. Bugs stay
ordinary exceptions, so they keep their tracebacks.
"""

from __future__ import annotations


class EqakitError(Exception):
    """An error caused by the user's input; the message must say what is wrong, where, and the fix."""

    exit_code = 1
    label = "error"  # the CLI prints "eqakit VERB: LABEL: message"


class ConfigError(EqakitError):
    """A configuration problem (YAML file or key=value override). Exit code 2, like argparse."""

    exit_code = 2


class DataError(EqakitError):
    """A problem in input data: missing files, corrupt images, malformed rows."""

    exit_code = 1


class Stopped(EqakitError):
    """A run stopped on request (Ctrl-C, SIGTERM, the web UI's Stop) at a point it can resume from.

    Exit code 130, as for an interrupted command; the message says where it stopped and how to go on.
    """

    exit_code = 130
    label = "stopped"
