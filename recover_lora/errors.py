"""The one exception type for expected failures: the CLI prints it as one line and exits non-zero."""


class RecoverLoraError(Exception):
    """A failure the user can act on: bad input, missing file, unsupported model.

    The message is one line that names the bad value and says what to do.
    """
