"""The one exception type users see.

Anything raised as `GptpipeError` is bad input or an unusable resource: the CLI prints its
message on one line and exits non-zero, without a traceback. Everything else is a bug and
keeps its traceback.
"""


class GptpipeError(Exception):
    """A problem the user can fix; the message says what to fix."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an exception's message, for a one-line error or warning.

    Falls back to the exception's type name when the message is empty (`str(OSError())` is "");
    limit: at most that many characters (library messages can run to a page).
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if limit is None else line[:limit]
