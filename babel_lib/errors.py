"""The one exception type users see: a one-line message that names the problem and the fix."""


class BabelError(ValueError):
    """Bad input or environment; the message says what is wrong and how to fix it."""
