"""Build the GPU machines' extension here, before one starts: `make gpu-prebuild`.

    python3 tools/gpu_prebuild.py venv VENV --torch 2.11.0     (with any python3: stdlib only)
    VENV/bin/python tools/gpu_prebuild.py build PREBUILT_DIR --archs "8.0;9.0"

The GPU machines run another Python (3.12) and torch (2.11, CUDA 13) than .venv. The extension is
built against CPython's stable ABI (setup.py), so a binary built here with this machine's Python
loads there as long as torch is the same version with the same CUDA major version.

  venv   creates VENV with torch==<version> from PyPI (its default Linux wheel is the CUDA build)
         and its nvidia-* libraries (about 5 GB, downloaded once), ninja and numpy.
  build  compiles the extension with nvcc for the archs (INCSEG_FORCE_CUDA=1: no GPU is needed),
         in build/gpu-prebuild/ (ninja recompiles only what changed), writes
         PREBUILT_DIR/_C.abi3.so (host debug info stripped; the kernels' -lineinfo, inside the
         CUDA fat binary, stays), checks with cuobjdump that every arch has its machine code and
         every cubin its line table, and writes PREBUILT_DIR/manifest.json:
         {"torch", "cuda", "archs", "sha256"}, which tools/gpu_check.py reads. PREBUILT_DIR must
         be named torch-<torch version>-cu<CUDA major> after the running torch.

Each part prints how long it took. tools/prebuilt_check.py then proves that the binary loads and runs.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "gpu-prebuild")
EXTENSION_FILE = "_C.abi3.so"
MANIFEST_FILE = "manifest.json"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
VENV_PACKAGES = ["numpy", "ninja"]


@contextlib.contextmanager
def timed(part):
    print(f"gpu-prebuild: {part} ...", flush=True)
    start = time.monotonic()
    yield
    print(f"gpu-prebuild: {part} took {time.monotonic() - start:.0f} s", flush=True)


def run(command, **kwargs):
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def public_version(version):
    """torch's version without its local part: 2.11.0+cu130 -> 2.11.0."""
    return version.split("+")[0]


def prebuilt_dir_name(torch_version, cuda_version):
    return f"torch-{public_version(torch_version)}-cu{cuda_version.split('.')[0]}"


def create_venv(venv, torch_version):
    python = os.path.join(venv, "bin", "python")
    with timed(f"virtual environment {venv} with torch=={torch_version}"):
        if not os.path.exists(python):
            run([sys.executable, "-m", "venv", venv])
        run(
            [python, "-m", "pip", "install", "--progress-bar", "off", f"torch=={torch_version}", *VENV_PACKAGES],
            cwd=ROOT,
        )
        report = subprocess.run(
            [python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        if public_version(report[0]) != torch_version or report[1] == "None":
            raise SystemExit(
                f"gpu-prebuild: {venv} has torch {report[0]} (CUDA {report[1]}), not {torch_version} with CUDA"
            )
        print(f"gpu-prebuild: {venv}: torch {report[0]}, CUDA {report[1]}", flush=True)


def compile_extension(archs):
    cuda_home = os.environ.get("CUDA_HOME") or DEFAULT_CUDA_HOME
    environment = dict(
        os.environ,
        TORCH_CUDA_ARCH_LIST=archs,
        INCSEG_FORCE_CUDA="1",
        CUDA_HOME=cuda_home,
        MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
    )
    with timed(f"compile for {archs} (CUDA_HOME={cuda_home}, MAX_JOBS={environment['MAX_JOBS']})"):
        run(
            [
                sys.executable,
                "setup.py",
                "build_ext",
                "--force",  # setuptools only compares the .cpp/.cu dates; ninja still skips what is current
                "--build-lib",
                os.path.join(BUILD_DIR, "lib"),
                "--build-temp",
                os.path.join(BUILD_DIR, "temp"),
            ],
            cwd=ROOT,
            env=environment,
        )
    return os.path.join(BUILD_DIR, "lib", "incseg_fast", EXTENSION_FILE), cuda_home


def find_cuobjdump(cuda_home):
    """The toolkit's cuobjdump, else the one Triton ships (torch's CUDA wheels depend on Triton)."""
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")]
    triton = importlib.util.find_spec("triton")
    if triton is not None:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit(f"gpu-prebuild: no cuobjdump to check the CUDA code with; looked for {', '.join(candidates)}")


def check_device_code(binary, archs, cuobjdump):
    """Every arch needs its machine code (sm_XY: without it the GPU has nothing to run), and every
    cubin its line table (-lineinfo, for compute-sanitizer's and Nsight Compute's source lines)."""
    listing = subprocess.run([cuobjdump, "--list-elf", binary], check=True, capture_output=True, text=True).stdout
    found = set(re.findall(r"\.(sm_\d+)\.cubin", listing))
    wanted = {"sm_" + arch.replace(".", "") for arch in archs.split(";")}
    if found != wanted:
        raise SystemExit(f"gpu-prebuild: {binary} has machine code for {sorted(found)}, expected {sorted(wanted)}")
    cubins = subprocess.run([cuobjdump, "-elf", binary], check=True, capture_output=True, text=True).stdout
    cubins = cubins.split("Fatbin elf code:")[1:]
    if not all(".nv_debug_line_sass" in cubin for cubin in cubins):
        raise SystemExit(f"gpu-prebuild: {binary} has cubins without their -lineinfo line tables")
    print(f"gpu-prebuild: {len(cubins)} cubins for {', '.join(sorted(found))}, each with its line table", flush=True)


def sha256_of(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def package(binary, prebuilt_dir, torch, archs, cuobjdump):
    with timed(f"package into {prebuilt_dir}"):
        os.makedirs(prebuilt_dir, exist_ok=True)
        target = os.path.join(prebuilt_dir, EXTENSION_FILE)
        shutil.copyfile(binary, target)
        run(["strip", "--strip-debug", target])
        check_device_code(target, archs, cuobjdump)
        manifest = {
            "torch": public_version(torch.__version__),
            "cuda": torch.version.cuda,
            "archs": archs.split(";"),
            "sha256": sha256_of(target),
        }
        with open(os.path.join(prebuilt_dir, MANIFEST_FILE), "w") as file:
            json.dump(manifest, file, indent=2)
            file.write("\n")
        print(f"gpu-prebuild: {target}: {os.path.getsize(target) / 2**20:.1f} MiB; {json.dumps(manifest)}", flush=True)


def build(prebuilt_dir, archs):
    import torch

    if torch.version.cuda is None:
        raise SystemExit(
            f"gpu-prebuild: torch {torch.__version__} at {torch.__file__} has no CUDA; run it with the venv's python"
        )
    expected_name = prebuilt_dir_name(torch.__version__, torch.version.cuda)
    if os.path.basename(os.path.normpath(prebuilt_dir)) != expected_name:
        raise SystemExit(
            f"gpu-prebuild: torch {torch.__version__} (CUDA {torch.version.cuda}) builds into "
            f"{expected_name}/, not {prebuilt_dir}"
        )
    binary, cuda_home = compile_extension(archs)
    package(binary, prebuilt_dir, torch, archs, find_cuobjdump(cuda_home))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parts = parser.add_subparsers(dest="part", required=True)
    venv = parts.add_parser("venv", help="create the virtual environment with the GPU machines' torch")
    venv.add_argument("venv")
    venv.add_argument("--torch", required=True, help="torch version, e.g. 2.11.0")
    build_part = parts.add_parser(
        "build", help="compile the extension and write PREBUILT_DIR (run with the venv's python)"
    )
    build_part.add_argument("prebuilt_dir")
    build_part.add_argument("--archs", default="8.0;9.0", help='TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0"')
    args = parser.parse_args()
    if args.part == "venv":
        create_venv(args.venv, args.torch)
    else:
        build(args.prebuilt_dir, args.archs)


if __name__ == "__main__":
    main()
