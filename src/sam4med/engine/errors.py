"""The one error type for bad user input: its message is a single line naming the file or argument."""


class InputError(ValueError):
    """Raised for unreadable files, mismatched sizes, bad prompts and other bad input."""


def one_line(error: BaseException) -> str:
    """An exception's message folded onto one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def hw(shape: tuple[int, ...]) -> str:
    """A shape as HxW, the way messages name image sizes."""
    return f"{shape[0]}x{shape[1]}"
