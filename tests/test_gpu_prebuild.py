"""The prebuilt extension's layout and manifest (tools/gpu_prebuild.py, tools/prebuilt_check.py).

The proof that a prebuilt binary loads and runs is `make gpu-prebuild` itself, whose last step is
tools/prebuilt_check.py with the GPU machines' torch; these tests cover what that needs no build for.
"""

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TORCH_2_11_CU13 = types.SimpleNamespace(__version__="2.11.0+cu130", version=types.SimpleNamespace(cuda="13.0"))


@pytest.fixture
def tools(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    return types.SimpleNamespace(
        prebuild=importlib.import_module("gpu_prebuild"), check=importlib.import_module("prebuilt_check")
    )


@pytest.fixture
def prebuilt(tmp_path, tools):
    """A folder as `make gpu-prebuild` writes it for torch 2.11 with CUDA 13, with a stand-in binary."""
    folder = tmp_path / "torch-2.11.0-cu13"
    folder.mkdir()
    binary = folder / tools.prebuild.EXTENSION_FILE
    binary.write_bytes(b"stand-in for the extension")
    manifest = {"torch": "2.11.0", "cuda": "13.0", "archs": ["8.0", "9.0"], "sha256": tools.prebuild.sha256_of(binary)}
    (folder / tools.prebuild.MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def test_prebuilt_folder_is_named_for_the_torch_version_and_cuda_major_version(tools):
    assert tools.prebuild.prebuilt_dir_name("2.11.0+cu130", "13.0") == "torch-2.11.0-cu13"
    assert tools.prebuild.prebuilt_dir_name("2.12.1", "12.8") == "torch-2.12.1-cu12"


def test_the_check_accepts_the_manifest_the_build_writes(tools, prebuilt):
    manifest, binary = tools.check.read_manifest(str(prebuilt), TORCH_2_11_CU13)
    assert manifest["archs"] == ["8.0", "9.0"] and Path(binary) == prebuilt / "_C.abi3.so"


def test_the_check_rejects_a_binary_that_is_not_the_manifests(tools, prebuilt):
    (prebuilt / "_C.abi3.so").write_bytes(b"another build")
    with pytest.raises(tools.check.CheckFailed, match="sha256"):
        tools.check.read_manifest(str(prebuilt), TORCH_2_11_CU13)


def test_the_check_rejects_another_torch_or_cuda(tools, prebuilt):
    for torch_version, cuda in (("2.12.0+cu130", "13.0"), ("2.11.0+cu128", "12.8")):
        other = types.SimpleNamespace(__version__=torch_version, version=types.SimpleNamespace(cuda=cuda))
        with pytest.raises(tools.check.CheckFailed, match="the manifest is for torch 2.11.0 CUDA 13.0"):
            tools.check.read_manifest(str(prebuilt), other)


def test_the_check_rejects_a_manifest_with_other_keys(tools, prebuilt):
    manifest_file = prebuilt / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["python"] = "3.11"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(tools.check.CheckFailed, match="keys"):
        tools.check.read_manifest(str(prebuilt), TORCH_2_11_CU13)


def test_the_build_refuses_a_folder_named_for_another_torch(tools, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", TORCH_2_11_CU13)
    with pytest.raises(SystemExit, match="builds into torch-2.11.0-cu13/"):
        tools.prebuild.build(str(tmp_path / "torch-2.12.0-cu13"), "8.0;9.0")


def _stand_in_cuobjdump(folder, cubins):
    """A cuobjdump that lists the given cubins, as {name: has_line_table}, like the real one's output."""
    listing = "".join(f"ELF file {i + 1}: {name}\n" for i, name in enumerate(cubins))
    dumps = "".join(
        f"\nFatbin elf code:\n================\narch = {name.split('.')[1]}\n.text\n"
        + (".nv_debug_line_sass\n" if has_line_table else "")
        for name, has_line_table in cubins.items()
    )
    (folder / "listing.txt").write_text(listing)
    (folder / "dumps.txt").write_text(dumps)
    script = folder / "cuobjdump"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" = --list-elf ]; then cat {folder}/listing.txt; else cat {folder}/dumps.txt; fi\n'
    )
    script.chmod(0o755)
    return str(script)


def test_device_code_check_accepts_every_arch_with_its_line_tables(tools, tmp_path, capsys):
    cubins = {f"{kernels}.{arch}.cubin": True for kernels in ("losses", "attention") for arch in ("sm_80", "sm_90")}
    tools.prebuild.check_device_code("_C.abi3.so", "8.0;9.0", _stand_in_cuobjdump(tmp_path, cubins))
    assert "4 cubins for sm_80, sm_90" in capsys.readouterr().out


def test_device_code_check_rejects_a_missing_arch(tools, tmp_path):
    cuobjdump = _stand_in_cuobjdump(tmp_path, {"losses.sm_80.cubin": True})
    with pytest.raises(SystemExit, match=r"machine code for \['sm_80'\], expected \['sm_80', 'sm_90'\]"):
        tools.prebuild.check_device_code("_C.abi3.so", "8.0;9.0", cuobjdump)


def test_device_code_check_rejects_a_cubin_without_its_line_table(tools, tmp_path):
    cuobjdump = _stand_in_cuobjdump(tmp_path, {"losses.sm_80.cubin": True, "losses.sm_90.cubin": False})
    with pytest.raises(SystemExit, match="without their -lineinfo line tables"):
        tools.prebuild.check_device_code("_C.abi3.so", "8.0;9.0", cuobjdump)
