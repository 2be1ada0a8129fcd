"""The one exception type the CLI turns into a single clean line.

Anything a user can get wrong (a config value, a path, a missing file) raises
``CfgxError`` with a message that names the problem *and* the fix; the CLI
prints it on one line and exits non-zero without a traceback.
"""


class CfgxError(Exception):
    """A user-facing error: message is one line naming the problem and the fix."""

    exit_code = 2
