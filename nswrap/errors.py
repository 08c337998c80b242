"""The errors nswrap raises: the one type that reaches the user (one line, the culprit named, an
exit code), and the two a follower acts on (FailClosed stops the instance, TryAgain retries)."""

EXIT_USAGE = 2
EXIT_FAILED = 125  # nswrap itself failed before the server started
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class NswrapError(Exception):
    """A failure explained in one line; `code` is the process exit status it maps to."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class UsageError(NswrapError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class FailClosed(NswrapError):
    """nswrap's guard could not be put back: the instance must stop."""


class TryAgain(NswrapError):
    """Following the host could not make every change (the host is changing too): later."""


QUOTED = 60  # characters of a user's value an error line shows


def quoted(value: object) -> str:
    """A value the user gave (command line, NSWRAP_*, config file), quoted for an error line:
    repr() of at most QUOTED characters, then … and the whole length. The value may be a
    megabyte, or a secret from a root-only file read through a delegated --config: the line
    names it without carrying all of it."""
    if isinstance(value, str):
        return repr(value) if len(value) <= QUOTED else f"{value[:QUOTED]!r}… ({len(value)} characters)"
    return cut(repr(value), QUOTED)


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters, … and its length."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def listed(items: object, shown: int = 5) -> str:
    """Items for a warning or an error, comma-separated: the first `shown`, then how many more
    (10,000 published ports are one short line, not 100 KB)."""
    words = [str(item) for item in items]  # type: ignore[attr-defined]
    more = f" … and {len(words) - shown} more" if len(words) > shown else ""
    return ", ".join(words[:shown]) + more
