"""The build's progress in a few lines: reads ``pip install -v`` output on stdin, writes all of it to
LOG, and prints ninja's counter with the file it compiles (``[3/27] csrc/cpu/logit_losses.cpp``) and
every compiler error or warning. Used by the Makefile, whose build would otherwise print either
nothing for ten minutes (``pip -q``) or every compiler command line (``pip -v``).

    pip install -v ... 2>&1 | python tools/build_progress.py LOG
"""

import os
import re
import sys

NINJA_STEP = re.compile(r"^\s*\[(\d+/\d+)\] .* -c (\S+)")
DIAGNOSTIC = re.compile(r"error|warning", re.IGNORECASE)  # also torch's UserWarning, e.g. ninja not found
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def summary(line, root=ROOT):
    """What to print for one line of the build's output, or None."""
    step = NINJA_STEP.match(line)
    if step:
        counter, source = step.groups()
        return f"[{counter}] {source.removeprefix(root)}"
    return line.rstrip("\n") if DIAGNOSTIC.search(line) else None


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: python tools/build_progress.py LOG  (reads the build's output on stdin)")
    with open(argv[1], "w", encoding="utf-8") as log:
        for line in sys.stdin:
            log.write(line)
            shown = summary(line)
            if shown is not None:
                print(shown, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
