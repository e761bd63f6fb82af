"""The one error every command turns into a message and exit 2: bad input."""


class UsageError(Exception):
    """Bad input: the sweep cannot start. The message says what and where."""
