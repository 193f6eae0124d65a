"""Build for incseg_fast and its compiled extension ``incseg_fast._C``.

Environment switches:
  INCSEG_SKIP_EXT=1    install the pure-Python package (reference and Triton backends only)
  INCSEG_FORCE_CUDA=1  compile csrc/cuda/*.cu even when torch reports no CUDA device/toolkit
  INCSEG_DEBUG=1       build with -O0 -g
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


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
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG", "--use_fast_math"]) + [
            "-std=c++20"
        ]
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
