"""The prebuilt extension of `make gpu-prebuild`, found and installed by tools/gpu_check.py.

A prebuilt folder is `prebuilt/torch-<torch version without +local>-cu<CUDA major>/` with
`_C.abi3.so` and `manifest.json`:
{"torch": "2.11.0", "cuda": "13.0", "archs": ["8.0", "9.0"], "sha256": "<hex of the .so>"}.
It is used only when it was built for the running torch (version and CUDA major), for the device's
compute capability, and the .so is the one the manifest describes; otherwise gpu-check builds.
"""

import glob
import hashlib
import json
import os
import shutil

LIBRARY = "_C.abi3.so"
MANIFEST = "manifest.json"


def folder_name(torch_version, cuda_version):
    """prebuilt/'s folder for a torch version ('2.11.0+cu130') and its CUDA version ('13.0')."""
    return f"torch-{torch_version.split('+')[0]}-cu{cuda_version.split('.')[0]}"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _major(version):
    return str(version).split(".")[0]


def _arch(text):
    """'9.0a' and '9.0+PTX' run on a 9.0 device as '9.0' does."""
    return str(text).split("+")[0].rstrip("af")


def match_prebuilt(prebuilt_root, torch_version, cuda_version, device_arch):
    """(path of the .so, None) when prebuilt_root holds an extension for this torch, CUDA major and
    device arch ('9.0') whose sha256 is the manifest's; else (None, why not)."""
    if not cuda_version:
        return None, f"torch {torch_version} has no CUDA"
    folder = os.path.join(prebuilt_root, folder_name(torch_version, cuda_version))
    library, manifest_path = os.path.join(folder, LIBRARY), os.path.join(folder, MANIFEST)
    if not os.path.isfile(library) or not os.path.isfile(manifest_path):
        return None, f"no {os.path.relpath(library, os.path.dirname(prebuilt_root))} with a {MANIFEST}"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        wanted = (manifest["torch"], manifest["cuda"], manifest["archs"], manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{manifest_path} is unreadable ({type(error).__name__}: {error})"
    built_torch, built_cuda, archs, sha256 = wanted
    if built_torch != torch_version.split("+")[0]:
        return None, f"built for torch {built_torch}, running {torch_version}"
    if _major(built_cuda) != _major(cuda_version):
        return None, f"built for CUDA {built_cuda}, torch has CUDA {cuda_version}"
    if device_arch is not None and _arch(device_arch) not in {_arch(a) for a in archs}:
        return None, f"built for archs {', '.join(archs)}, the device is {device_arch}"
    if _sha256(library) != sha256:
        return None, f"{LIBRARY}'s sha256 is not the manifest's"
    return library, None


def install_prebuilt(library, package_dir):
    """Copies the prebuilt library into package_dir as _C.abi3.so, first removing every other _C*.so
    there (Python would pick a version-tagged one before it). Returns the installed path."""
    for old in glob.glob(os.path.join(package_dir, "_C*.so")):
        os.remove(old)
    target = os.path.join(package_dir, LIBRARY)
    shutil.copyfile(library, target)
    return target
