"""The one error type that reaches the user as a single line on stderr (exit code 2, no traceback)."""


class UserError(Exception):
    """A problem the user can fix. The message names the problem *and* the fix, in one line."""

    exit_code = 2
