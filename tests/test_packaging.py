"""The package as a user installs it: a wheel with the benchmarks inside and nothing named
`benchmarks` at the top level, whose `incseg-fast bench` runs from outside the repository; and an
extension built against CPython's stable ABI, one `_C.abi3.so` for every Python (setup.py)."""

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from distutils.core import run_setup
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


def test_wheel_carries_the_benchmarks_and_runs_them_outside_the_repository(tmp_path):
    # The pure-Python wheel (INCSEG_SKIP_EXT=1): building the extension again would only cost minutes.
    environment = dict(os.environ, INCSEG_SKIP_EXT="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            str(REPOSITORY),
            "-w",
            str(tmp_path),
        ],
        check=True,
        env=environment,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("incseg_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "incseg_fast/bench/report.py" in names and "incseg_fast/bench/__main__.py" in names
    assert {name.split("/")[0] for name in names} == {"incseg_fast", wheel.name.split("-py3")[0] + ".dist-info"}

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    # -S: no .pth files, so the development tree's editable install cannot stand in for the wheel;
    # torch comes from this environment's site-packages, as a user's own torch would.
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    run = subprocess.run(
        [sys.executable, "-S", str(site / "bin" / "incseg-fast"), "bench", "--quick", "--providers", "eager"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "incremental_loss" in run.stdout and "attentive_distillation" in run.stdout
    where = subprocess.run(
        [sys.executable, "-S", "-c", "import incseg_fast; print(incseg_fast.__file__)"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)


def _configured_distribution(monkeypatch):
    """setup.py's distribution, configured but not built (the extension compiles nothing here)."""
    monkeypatch.chdir(REPOSITORY)
    monkeypatch.delenv("INCSEG_SKIP_EXT", raising=False)
    return run_setup(str(REPOSITORY / "setup.py"), stop_after="init")


def test_a_wheel_with_the_extension_is_tagged_for_every_python_the_package_supports(monkeypatch):
    bdist_wheel = _configured_distribution(monkeypatch).get_command_obj("bdist_wheel")
    bdist_wheel.ensure_finalized()
    python, abi, _ = bdist_wheel.get_tag()
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    oldest_python = re.search(r'^requires-python = ">=(\d+)\.(\d+)"$', pyproject, re.MULTILINE).groups()
    assert (python, abi) == ("cp" + "".join(oldest_python), "abi3")


def test_an_in_place_build_removes_the_extension_built_for_one_python(tmp_path, monkeypatch):
    distribution = _configured_distribution(monkeypatch)
    package = tmp_path / "package"
    package.mkdir()
    distribution.package_dir = {"incseg_fast": str(package)}
    build_ext = distribution.get_command_obj("build_ext")
    build_ext.build_lib = str(tmp_path / "lib")
    build_ext.ensure_finalized()
    built = tmp_path / "lib" / "incseg_fast" / "_C.abi3.so"
    built.parent.mkdir(parents=True)
    built.write_bytes(b"new build")
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"old build")
    (package / "_other.cpython-311-x86_64-linux-gnu.so").write_bytes(b"another extension")

    build_ext.copy_extensions_to_source()

    assert sorted(path.name for path in package.iterdir()) == ["_C.abi3.so", "_other.cpython-311-x86_64-linux-gnu.so"]
    assert (package / "_C.abi3.so").read_bytes() == b"new build"


def test_the_built_extension_is_one_binary_for_every_python():
    import incseg_fast.ops

    if not incseg_fast.ops.HAS_EXTENSION:
        pytest.skip(f"the extension is not built ({incseg_fast.ops.IMPORT_ERROR})")
    assert Path(incseg_fast.ops._C.__file__).name == "_C.abi3.so"
