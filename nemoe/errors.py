"""Errors a user can cause (config, data, checkpoints, paths).

The entry point catches `UserError`, prints its message once and exits with
`exit_code` -- no traceback. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the whole message."""

    exit_code = 2
