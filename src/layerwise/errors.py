"""The one exception type users see.

Every check of user input raises :class:`LayerwiseError` with a message that
names the fix; the CLI prints it on one line instead of a traceback.
A message names the API's own arguments in backticks (`n`, `export`); the
CLI shows each as the flag that sets it (``--n``, ``--export``), so both
kinds of user read a fix they can apply.
"""


class LayerwiseError(Exception):
    """A problem with the user's input or environment, explained in one line."""
