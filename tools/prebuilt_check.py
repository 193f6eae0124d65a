"""Prove that a prebuilt extension loads and runs, without a GPU: the last step of `make gpu-prebuild`.

    .gpu-prebuild-venv/bin/python tools/prebuilt_check.py prebuilt/torch-2.11.0-cu13

Run it with the torch the binary was built for (the prebuild venv's). It checks the manifest
against the binary (sha256) and the running torch (version, CUDA), puts the binary into a temporary
copy of the incseg_fast package, imports that copy and checks that its ops carry CUDA kernels; then
runs the CPU half: incremental_loss and attentive_distillation on the compiled CPU kernels and on
the CUDA kernels' CPU emulation, forward and backward, against the reference backend. Any
difference fails loudly (exit status 1). A missing CUDA symbol or a torch ABI mismatch fails at the
import already, which is the point: the GPU machine would fail the same way.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from gpu_prebuild import EXTENSION_FILE, MANIFEST_FILE, ROOT, prebuilt_dir_name, public_version, sha256_of

MANIFEST_KEYS = {"torch", "cuda", "archs", "sha256"}
CHECKED_BACKENDS = ("cpu", "cuda_emulator")


class CheckFailed(Exception):
    pass


def read_manifest(prebuilt_dir, torch):
    with open(os.path.join(prebuilt_dir, MANIFEST_FILE)) as file:
        manifest = json.load(file)
    if set(manifest) != MANIFEST_KEYS:
        raise CheckFailed(f"{MANIFEST_FILE} has the keys {sorted(manifest)}, expected {sorted(MANIFEST_KEYS)}")
    binary = os.path.join(prebuilt_dir, EXTENSION_FILE)
    if sha256_of(binary) != manifest["sha256"]:
        raise CheckFailed(f"{binary}'s sha256 is not the manifest's: rebuild with `make gpu-prebuild`")
    running = {"torch": public_version(torch.__version__), "cuda": torch.version.cuda}
    if {key: manifest[key] for key in running} != running:
        raise CheckFailed(f"the manifest is for torch {manifest['torch']} CUDA {manifest['cuda']}, this is {running}")
    if os.path.basename(os.path.normpath(prebuilt_dir)) != prebuilt_dir_name(torch.__version__, torch.version.cuda):
        raise CheckFailed(f"{prebuilt_dir} is not named for torch {torch.__version__} CUDA {torch.version.cuda}")
    return manifest, binary


def import_package_with(binary, package_root):
    """The worktree's incseg_fast, copied without any built extension, with the prebuilt one in it."""
    target = os.path.join(package_root, "incseg_fast")
    shutil.copytree(os.path.join(ROOT, "incseg_fast"), target, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copyfile(binary, os.path.join(target, EXTENSION_FILE))
    sys.path.insert(0, package_root)
    import incseg_fast
    import incseg_fast.ops

    loaded = incseg_fast.ops._C.__file__ if incseg_fast.ops.HAS_EXTENSION else None
    if loaded != os.path.join(target, EXTENSION_FILE):
        raise CheckFailed(
            f"incseg_fast._C did not load from the prebuilt copy: {incseg_fast.ops.IMPORT_ERROR or loaded}"
        )
    if not incseg_fast.ops.HAS_CUDA_KERNELS:
        raise CheckFailed("the prebuilt extension registers no CUDA kernels: it was built without CUDA")
    return incseg_fast


def compare(name, fused, expected, dtype, vocabulary, torch):
    rtol = vocabulary.RTOL[dtype]
    torch.testing.assert_close(fused, expected, rtol=rtol, atol=rtol, msg=lambda message: f"{name}: {message}")


def check_ops(incseg_fast, torch):
    """Each op, forward and gradient, on each CPU-side backend against the reference."""
    from incseg_fast import vocabulary

    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32
    x = torch.randn(2, 7, 9, 11, generator=generator, dtype=dtype)
    y = torch.randn(2, 5, 9, 11, generator=generator, dtype=dtype)
    labels = torch.randint(0, 7, (2, 9, 11), generator=generator)
    labels[0, 0, :4] = 255  # ignored pixels
    f, g = (torch.randn(2, 6, 5, 4, generator=generator, dtype=dtype) for _ in range(2))
    a, b = (torch.rand(2, 6, generator=generator, dtype=dtype) for _ in range(2))

    def losses(backend):
        inputs = [t.clone().requires_grad_() for t in (x, f)]
        ce, kd = incseg_fast.incremental_loss(inputs[0], labels, y, old_classes=5, backend=backend)
        ad = incseg_fast.attentive_distillation(inputs[1], g, a, b, backend=backend)
        (ce + kd + ad).backward()
        return {"ce": ce, "kd": kd, "ad": ad, "d(loss)/dx": inputs[0].grad, "d(loss)/df": inputs[1].grad}

    expected = losses("reference")
    for backend in CHECKED_BACKENDS:
        for name, value in losses(backend).items():
            compare(f"{backend} {name}", value.detach(), expected[name].detach(), dtype, vocabulary, torch)
        print(f"prebuilt-check: backend {backend}: {', '.join(expected)} match the reference", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prebuilt_dir", help="e.g. prebuilt/torch-2.11.0-cu13")
    args = parser.parse_args()
    start = time.monotonic()
    import torch

    try:
        manifest, binary = read_manifest(args.prebuilt_dir, torch)
        print(
            f"prebuilt-check: {binary} ({os.path.getsize(binary) / 2**20:.1f} MiB) with torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}, archs {manifest['archs']}",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="prebuilt-check-") as package_root:
            check_ops(import_package_with(binary, package_root), torch)
    except (CheckFailed, AssertionError, ImportError, OSError) as error:
        print(f"prebuilt-check: FAILED: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"prebuilt-check: passed in {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
