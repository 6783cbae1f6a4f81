"""The one exception type for every user-facing error."""


class OnnxlipError(Exception):
    """A problem with the user's model, input or options, stated in one line."""
