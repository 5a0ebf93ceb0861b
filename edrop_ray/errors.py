"""The one exception a user can cause.

Everything a user can get wrong (config, data root, checkpoint, run directory) raises
:class:`UserError` where it enters; the CLI prints its message on one line and exits 2.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
