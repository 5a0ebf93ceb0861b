"""The one exception a user can cause.

Everything a user can get wrong (config, data root, checkpoint, run directory) raises
:class:`UserError` where it enters; the CLI prints its message on one line and exits 2.
"""

__all__ = ["UserError", "RunInterrupted"]


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``run_dir`` holds a checkpoint to resume from, or is None when the
    run was removed (interrupted before its first checkpoint; ``out`` is as it was)."""

    def __init__(self, run_dir, out):
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.out = out
