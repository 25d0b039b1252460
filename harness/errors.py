"""User-facing errors: a short message naming the config key or file, printed without a traceback."""


class HarnessError(Exception):
    """Bad input from the user (config, file, factory). The CLI prints ``str(err)`` and exits non-zero."""

    def __init__(self, message: str, *, key: str | None = None):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
