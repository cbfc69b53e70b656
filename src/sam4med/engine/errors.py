"""The one error type for bad user input: its message is a single line naming the file or argument."""


class InputError(ValueError):
    """Raised for unreadable files, mismatched sizes, bad prompts and other bad input."""
