"""The one error type the command line turns into a one-line message and exit code 2."""


class UsageError(ValueError):
    """A bad name, path, option or combination given by the user; the message names it and what is accepted."""
