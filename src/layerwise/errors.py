"""The one exception type users see.

Every check of user input raises :class:`LayerwiseError` with a message that
names the fix; the CLI prints it on one line instead of a traceback.
"""


class LayerwiseError(Exception):
    """A problem with the user's input or environment, explained in one line."""
