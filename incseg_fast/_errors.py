"""Error messages of one line (docs/RELIABILITY.md): what failed, for which file, and the cause."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (a library's may run to many), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
