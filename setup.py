"""Build for incseg_fast and its compiled extension ``incseg_fast._C``.

Environment switches:
  INCSEG_SKIP_EXT=1    install the pure-Python package (reference and Triton backends only)
  INCSEG_FORCE_CUDA=1  compile csrc/cuda/*.cu even when torch reports no CUDA device/toolkit
  INCSEG_DEBUG=1       build with -O0 -g
  TORCH_CUDA_ARCH_LIST GPU architectures of the CUDA kernels (default: the visible GPUs', else "8.0;9.0")
  MAX_JOBS             parallel compile jobs (read by torch's BuildExtension)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


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


def _extensions():
    if _flag("INCSEG_SKIP_EXT"):
        return [], {}
    import torch
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
    cxx += ["-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    macros = []
    ext_cls = CppExtension
    if use_cuda:
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
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="incseg_fast",
    version="0.1.0",
    packages=find_packages(include=["incseg_fast", "incseg_fast.*", "benchmarks"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
