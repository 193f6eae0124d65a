"""The package as a user installs it: a wheel with the benchmarks inside and nothing named
`benchmarks` at the top level, whose `incseg-fast bench` runs from outside the repository; and an
extension built against CPython's stable ABI, one `_C.abi3.so` for every Python (setup.py)."""

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
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


def _build_requirements():
    sys.path.insert(0, str(REPOSITORY))
    try:
        import build_requirements
    finally:
        sys.path.remove(str(REPOSITORY))
    return build_requirements


def test_build_requirements_name_what_is_missing_or_too_old():
    requirements = _build_requirements()
    complete = {"setuptools": "65.5.0", "wheel": "0.45", "ninja": "1.13", "numpy": "2.4", "torch": "2.13.0+cpu"}

    def missing(**changes):
        versions = {**complete, **changes}
        return requirements.missing(installed=versions.get, ninja_on_path=False, torch_range=">=2.11,<2.14")

    assert missing() == []
    assert missing(wheel=None) == ["wheel"]  # setuptools 65 builds wheels with the wheel package only
    assert missing(wheel=None, setuptools="70.1.0") == []  # from 70.1 setuptools has bdist_wheel itself
    assert missing(setuptools="63.2") == ["setuptools>=64"]
    assert missing(setuptools=None, wheel=None, numpy=None, ninja=None) == ["setuptools>=64", "wheel", "ninja", "numpy"]
    assert missing(torch="2.10.1") == ["torch>=2.11,<2.14"] == missing(torch="2.14.0") == missing(torch=None)
    assert missing(torch="2.11.0a0+git") == []
    assert requirements.missing(installed={"setuptools": "80"}.get, with_extension=False) == []

    line = requirements.message(["wheel", "torch>=2.11,<2.14"], torch_found="2.10.1")
    assert "\n" not in line and "(found torch 2.10.1)" in line
    assert "`python -m pip install wheel 'torch>=2.11,<2.14'`" in line


def test_the_torch_range_checked_is_pyproject_s():
    requirements = _build_requirements()
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    assert f'"torch{requirements.torch_specifier(pyproject)}"' in pyproject
    assert requirements.satisfies("2.13.0", requirements.torch_specifier(pyproject))


def _fresh_venv(folder, with_setuptools):
    """A virtual environment without pip, numpy, ninja or torch (setuptools linked from this one's if asked)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    if with_setuptools:
        import setuptools

        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        packages = Path(setuptools.__file__).parent.parent
        (dist_info,) = packages.glob("setuptools-*.dist-info")
        for name in ("setuptools", "_distutils_hack", dist_info.name):
            (Path(site) / name).symlink_to(packages / name)
    return python


def _source_copy(folder):
    """What the build reads before it compiles: the check must stop the build there."""
    folder.mkdir()
    for name in ("setup.py", "build_requirements.py", "pyproject.toml", "README.md"):
        (folder / name).write_bytes((REPOSITORY / name).read_bytes())
    return folder


def test_a_fresh_environment_gets_one_line_naming_the_install_command(tmp_path):
    python = _fresh_venv(tmp_path / "venv", with_setuptools=False)
    source = _source_copy(tmp_path / "source")
    environment = dict(os.environ, PATH=str(python.parent))  # no ninja on PATH either
    run = subprocess.run(
        [python, "setup.py", "bdist_wheel"], cwd=source, env=environment, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1 and run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("incseg_fast: building without isolation needs setuptools>=64, wheel, ninja, numpy, torch")
    assert "`python -m pip install 'setuptools>=64' wheel ninja numpy 'torch>=" in line
    assert sorted(p.name for p in source.iterdir()) == [
        "README.md",
        "build_requirements.py",
        "pyproject.toml",
        "setup.py",
    ]


def test_pip_install_without_build_isolation_stops_before_compiling(tmp_path):
    # pip runs the build in the fresh environment (setuptools only); --no-index: nothing is downloaded
    python = _fresh_venv(tmp_path / "venv", with_setuptools=True)
    source = _source_copy(tmp_path / "source")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-build-isolation", "--no-deps"]
        + ["--no-index", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines()]
    (line,) = [line for line in lines if line.startswith("incseg_fast:")]
    assert "numpy" in line and "torch>=" in line and "`python -m pip install" in line
    assert not any("building 'incseg_fast._C'" in line or line.startswith("[1/") for line in lines)
    assert not (source / "build").exists()


def test_the_make_build_shows_ninja_s_counter_and_diagnostics_and_logs_everything(tmp_path):
    root = str(REPOSITORY) + os.sep
    build_output = (
        "  Running command Building editable for incseg_fast (pyproject.toml)\n"
        f"  [3/27] c++ -MMD -MF {root}build/temp/csrc/cpu/kd.o.d -O3 -c {root}csrc/cpu/kd.cpp -o {root}build/kd.o\n"
        f"{root}csrc/cpu/kd.cpp:12:3: error: expected ';'\n"
        "  UserWarning: Attempted to use ninja as the BuildExtension backend but we could not find ninja.\n"
        "  copying build/lib/incseg_fast/_C.so -> incseg_fast\n"
    )
    log = tmp_path / "build.log"
    run = subprocess.run(
        [sys.executable, str(REPOSITORY / "tools" / "build_progress.py"), str(log)],
        input=build_output,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    assert run.stdout.splitlines() == [
        "[3/27] csrc/cpu/kd.cpp",
        f"{root}csrc/cpu/kd.cpp:12:3: error: expected ';'",
        "  UserWarning: Attempted to use ninja as the BuildExtension backend but we could not find ninja.",
    ]
    assert log.read_text() == build_output


def test_python_m_build_makes_an_sdist_that_builds_and_a_wheel_with_the_license(tmp_path):
    pytest.importorskip("build")
    # INCSEG_SKIP_EXT=1: the wheel (built from the sdist) without compiling; the sdist is the same
    environment = dict(os.environ, INCSEG_SKIP_EXT="1")
    command = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPOSITORY)]
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (sdist,) = tmp_path.glob("incseg_fast-*.tar.gz")
    (wheel,) = tmp_path.glob("incseg_fast-*.whl")
    prefix = sdist.name.removesuffix(".tar.gz") + "/"
    carried = {name.removeprefix(prefix) for name in tarfile.open(sdist).getnames()}
    sources = {str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "csrc").rglob("*") if p.is_file()}
    needed = {"setup.py", "build_requirements.py", "pyproject.toml", "README.md", "LICENSE", "CITATION.cff"}
    assert sources and sources | needed | {"CHANGELOG.md"} <= carried
    licenses = [name for name in zipfile.ZipFile(wheel).namelist() if name.endswith("LICENSE")]
    assert len(licenses) == 1 and ".dist-info/" in licenses[0]


def test_citation_and_changelog_name_the_package_s_version():
    version = re.search(r'^version = "([^"]+)"', (REPOSITORY / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert re.search(rf"^version: {re.escape(version)}$", (REPOSITORY / "CITATION.cff").read_text(), re.MULTILINE)
    assert f"## [{version}]" in (REPOSITORY / "CHANGELOG.md").read_text()
    assert "MIT License" in (REPOSITORY / "LICENSE").read_text()


def test_shipped_code_and_documents_name_no_issue_numbers():
    shipped = [*REPOSITORY.glob("incseg_fast/**/*.py"), *REPOSITORY.glob("tools/*.py"), *REPOSITORY.glob("docs/*.md")]
    shipped += [REPOSITORY / name for name in ("README.md", "DEVELOPERS.md", "CHANGELOG.md", "setup.py")]
    numbered = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)
    found = [
        f"{path.relative_to(REPOSITORY)}: {match.group()}"
        for path in shipped
        for match in numbered.finditer(path.read_text())
    ]
    assert found == []


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
