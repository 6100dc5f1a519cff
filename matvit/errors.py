"""The one exception type for mistakes a user can make; the doors print it as a one-line message."""


class UserError(ValueError):
    """Bad input from the user (path, image, spec, dataset, checkpoint, option)."""
