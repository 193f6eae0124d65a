"""What ``pip install --no-build-isolation .`` needs already installed, checked before the build starts.

Without build isolation the build requirements are the user's: a missing one otherwise shows up
minutes into the build, or as pip's ``invalid command 'bdist_wheel'``. ``setup.py`` calls
:func:`check` first; it uses the standard library only (no setuptools, no torch import) and stops
with one line naming the command that installs what is missing.
"""

import importlib.metadata
import os
import re
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))
SETUPTOOLS_MINIMUM = (64,)
# setuptools carries bdist_wheel itself from 70.1 on; before that it comes from the wheel package
SETUPTOOLS_WITH_BDIST_WHEEL = (70, 1)


def version_tuple(text):
    """(2, 13, 0) for "2.13.0+cpu" or "2.13.0rc1": the leading numeric release, enough to compare ranges."""
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(part) for part in numbers.group().split(".")) if numbers else ()


def satisfies(version, specifier):
    """Whether ``version`` meets a comma-separated specifier of >=, >, <=, < and == clauses ("X" alone: any)."""
    compare = {
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
        "==": lambda a, b: a == b,
    }
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        operator, bound = re.match(r"(>=|<=|==|>|<)\s*(\S+)", clause).groups()
        if not compare[operator](version_tuple(version), version_tuple(bound)):
            return False
    return True


def torch_specifier(pyproject_text):
    """The torch range of pyproject.toml's dependencies, e.g. ">=2.11,<2.14" (the one place it is written)."""
    return re.search(r'"torch\s*([^";]*)"', pyproject_text).group(1).strip()


def flag(name):
    """An environment switch such as INCSEG_SKIP_EXT=1: on unless unset, empty, 0 or false."""
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _installed(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing(installed=_installed, ninja_on_path=None, with_extension=True, torch_range=None):
    """The requirements (pip's spelling, e.g. "setuptools>=64") that are absent or too old here."""
    needs = []
    setuptools = installed("setuptools")
    if setuptools is None or version_tuple(setuptools) < SETUPTOOLS_MINIMUM:
        needs.append("setuptools>=64")
    if (setuptools is None or version_tuple(setuptools) < SETUPTOOLS_WITH_BDIST_WHEEL) and installed("wheel") is None:
        needs.append("wheel")
    if not with_extension:
        return needs
    if ninja_on_path is None:
        ninja_on_path = shutil.which("ninja") is not None
    if installed("ninja") is None and not ninja_on_path:
        needs.append("ninja")
    if installed("numpy") is None:
        needs.append("numpy")
    if torch_range is None:
        with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as pyproject:
            torch_range = torch_specifier(pyproject.read())
    torch = installed("torch")
    if torch is None or not satisfies(torch, torch_range):
        needs.append(f"torch{torch_range}")
    return needs


def message(needs, torch_found=None):
    """The one line printed when ``needs`` is not empty."""
    found = f" (found torch {torch_found})" if torch_found and any(n.startswith("torch") for n in needs) else ""
    command = " ".join(f"'{need}'" if any(c in need for c in "<>=") else need for need in needs)
    return (
        f"incseg_fast: building without isolation needs {', '.join(needs)} in this environment{found}: "
        f"run `python -m pip install {command}`, then the install again"
    )


def check():
    """Stop (SystemExit with the one line) when a build requirement is missing; INCSEG_SKIP_EXT=1
    (no extension) needs setuptools (and wheel) only."""
    needs = missing(with_extension=not flag("INCSEG_SKIP_EXT"))
    if needs:
        raise SystemExit(message(needs, _installed("torch")))
