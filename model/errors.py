"""The one exception type users see.

Anything raised as `GptpipeError` is bad input or an unusable resource: the CLI prints its
message on one line and exits non-zero, without a traceback. Everything else is a bug and
keeps its traceback.
"""


class GptpipeError(Exception):
    """A problem the user can fix; the message says what to fix."""
