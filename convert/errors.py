"""The one exception type graft's command line turns into a one-line message."""

from __future__ import annotations


class GraftError(Exception):
    """A problem with the user's input (file, layer, row); ``str(err)`` is the whole message.

    ``cli.py`` prints it as ``error: <message>`` and exits with status 2, never a traceback.
    """
