"""The package as a user installs it: a wheel with the benchmarks inside and nothing named
`benchmarks` at the top level, whose `incseg-fast bench` runs from outside the repository."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

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
