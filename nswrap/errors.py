"""The one error type that reaches the user: one line, the culprit named, an exit code."""

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
