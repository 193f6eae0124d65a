"""Error messages of one line (docs/RELIABILITY.md): what failed, for which file, and the cause."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line, as every other expected error of ``incseg-fast`` (argparse prints
    the whole usage first)."""

    def error(self, message):
        self.exit(2, f"incseg-fast: error: {message} (see {self.prog} --help)\n")


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (a library's may run to many), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
