"""Build of the compiled extension ``incseg_fast._C`` (name, version and packages: pyproject.toml).

The extension is built against the torch already installed, with CUDA when that torch has CUDA and
a toolkit is found: install with ``pip install --no-build-isolation .`` (or ``-e .``).
It uses only CPython's limited API (it registers torch ops and nothing else), so one binary,
``incseg_fast/_C.abi3.so``, loads in every Python from 3.10 on (a wheel is tagged cp310-abi3);
it still matches one torch version and one CUDA major version.

Environment switches:
  INCSEG_SKIP_EXT=1    install the pure-Python package (the reference backend only)
  INCSEG_FORCE_CUDA=1  compile csrc/cuda/*.cu even when torch reports no CUDA device/toolkit
  INCSEG_DEBUG=1       build with -O0 -g
  TORCH_CUDA_ARCH_LIST GPU architectures of the CUDA kernels (default: the visible GPUs', else "8.0;9.0")
  MAX_JOBS             parallel compile jobs (read by torch's BuildExtension)
"""

import glob
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_requirements.py, beside this file, whichever folder the build runs in
import build_requirements  # noqa: E402  (standard library only)

# The oldest Python the binary supports: requires-python's, and the value torch's BuildExtension
# itself defines for py_limited_api extensions (a different one would redefine the macro).
LIMITED_API_PYTHON = (3, 10)

build_requirements.check()  # before setuptools and torch are imported: one line saying what to install
_flag = build_requirements.flag

from setuptools import setup  # noqa: E402


def _default_cuda_arch_list(torch):
    """Sets TORCH_CUDA_ARCH_LIST, when the user has not, before BuildExtension reads it: the visible
    GPUs' compute capabilities, or 8.0 and 9.0 (A100, H100) when no GPU is visible (torch's own
    default would then be every architecture it supports, a long build)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    if torch.cuda.is_available():
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        arch_list, why = ";".join(f"{major}.{minor}" for major, minor in capabilities), "the visible GPUs"
    else:
        arch_list, why = "8.0;9.0", "no GPU visible"
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    print(f"incseg_fast: TORCH_CUDA_ARCH_LIST={arch_list} ({why}; set it to choose)", flush=True)


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise SystemExit(
            f"incseg_fast builds its extension against the torch already installed, and none imports "
            f"({error}): install torch first, then `pip install --no-build-isolation .`"
        ) from error
    return torch


def _check_cuda_home(cuda_home):
    """torch derives CUDA_HOME from where nvcc is found; a wrapper script outside the toolkit misleads it."""
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime_api.h")):
        raise SystemExit(
            f"incseg_fast: CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h; set CUDA_HOME to "
            "the CUDA toolkit (e.g. /usr/local/cuda), or INCSEG_SKIP_EXT=1 / a CPU torch for no CUDA"
        )


def _build_extension_class(base):
    class BuildExtensionReplacingOtherABIs(base):
        """An in-place build also removes the extension's files built for one Python (such as
        _C.cpython-311-x86_64-linux-gnu.so, from before the stable ABI): Python would import those
        in preference to _C.abi3.so."""

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                module_name = ext.name.rpartition(".")[2]
                for other in glob.glob(os.path.join(os.path.dirname(inplace_file), f"{module_name}.*.so")):
                    if os.path.basename(other) != os.path.basename(inplace_file):
                        print(f"incseg_fast: removing {other}, superseded by {inplace_file}", flush=True)
                        os.remove(other)

    return BuildExtensionReplacingOtherABIs


def _extensions():
    if _flag("INCSEG_SKIP_EXT"):
        return [], {}
    torch = _import_torch()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("INCSEG_DEBUG")
    # csrc/cuda/*.cpp is the CUDA kernels' torch glue: its CPU emulation of the kernels is always
    # built, its CUDA registrations only with INCSEG_WITH_CUDA.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cuda/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(cuda_sources) and (
        _flag("INCSEG_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # -ffp-contract=off: no FMA contraction, so a product such as alpha * y rounds the same in every
    # ISA copy of a kernel and in the CUDA emulator (docs/RELIABILITY.md#numerics).
    cxx += ["-std=c++20", "-fopenmp", "-ffp-contract=off"]
    extra = {"cxx": cxx}
    major, minor = LIMITED_API_PYTHON
    macros = [("Py_LIMITED_API", f"0x{major:02X}{minor:02X}0000")]
    ext_cls = CppExtension
    if use_cuda:
        _check_cuda_home(CUDA_HOME or "")
        sources += cuda_sources
        _default_cuda_arch_list(torch)
        # No --use_fast_math: it turns expf/logf and divisions into approximate intrinsics whose error
        # grows with |x|, which breaks float32 parity with the float64 reference (rtol 1e-5).
        # -lineinfo maps the machine code to source lines for compute-sanitizer and Nsight Compute
        # reports, at no run-time cost. tools/cuda_check.py (make cuda-check) uses these release flags.
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG", "-lineinfo"]) + ["-std=c++20"]
        macros.append(("INCSEG_WITH_CUDA", None))
        ext_cls = CUDAExtension
    ext = ext_cls(
        "incseg_fast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        define_macros=macros,
        py_limited_api=True,
    )
    return [ext], {"build_ext": _build_extension_class(BuildExtension)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp{}{}".format(*LIMITED_API_PYTHON)}},
)
