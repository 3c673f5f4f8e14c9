"""The one error type users see: its message says what was wrong and how to fix it."""


class SpecInferError(Exception):
    """Bad input or an unsupported setup; the CLI prints the message and exits non-zero."""
