"""tools/cuda_check.py's reading of SASS: store widths, the per-warp partials, which kernels are packed.
Pure text processing on small samples: no nvcc, no GPU."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_check", os.path.join(ROOT, "tools", "cuda_check.py"))
cuda_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_check)

# The shape of `nvdisasm -c -gi` output: two kernels; the first stores one 128-bit pack, a 32-bit value
# from its own code and a per-warp partial (grid.h line 75, inlined into the kernel); the second has no
# line info.
SAMPLE = """\
\t.section\t.text._Z6packedv,"ax",@progbits
.text._Z6packedv:
\t//## File "/src/csrc/cuda/kernels.cuh", line 212 inlined at "/src/csrc/cuda/launch.cuh", line 14
\t//## File "/src/csrc/cuda/launch.cuh", line 14
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0020*/                   STG.E.128 desc[UR6][R8.64], R4 ;
        /*0030*/                   STG.E desc[UR6][R8.64+0x10], R7 ;
\t//## File "/src/csrc/cuda/../common/grid.h", line 75 inlined at "/src/csrc/cuda/kernels.cuh", line 214
\t//## File "/src/csrc/cuda/kernels.cuh", line 214 inlined at "/src/csrc/cuda/launch.cuh", line 14
\t//## File "/src/csrc/cuda/launch.cuh", line 14
        /*0040*/              @!P0 STG.E desc[UR6][R2.64], R7 ;
        /*0050*/                   STS [R1], R7 ;
        /*0060*/                   EXIT ;
\t.section\t.text._Z5plainv,"ax",@progbits
.text._Z5plainv:
        /*0000*/                   STG.E.U16 desc[UR6][R2.64], R5 ;
        /*0010*/               @P1 STG.E.64 desc[UR6][R4.64], R6 ;
        /*0020*/                   ST.E.U8 desc[UR6][R4.64], R6 ;
        /*0030*/                   STL [R1+0x4], R6 ;
"""


@pytest.mark.parametrize(
    "opcode, bits",
    [
        ("STG.E.128", 128),
        ("STG.E.64", 64),
        ("STG.E", 32),
        ("STG.E.STRONG.GPU", 32),
        ("STG.E.U16", 16),
        ("STG.E.S8", 8),
        ("ST.E.128", 128),
        ("STS", None),
        ("STL.64", None),
        ("LDG.E.128", None),
        ("STSM", None),
    ],
)
def test_store_bits(opcode, bits):
    assert cuda_check.store_bits(opcode) == bits


def test_parse_sass_stores_widths_and_innermost_lines():
    stores = cuda_check.parse_sass_stores(SAMPLE)
    kernels = "/src/csrc/cuda/kernels.cuh"
    grid = os.path.normpath("/src/csrc/cuda/../common/grid.h")
    assert stores == {
        "_Z6packedv": [(128, kernels, 212), (32, kernels, 212), (32, grid, 75)],
        "_Z5plainv": [(16, None, 0), (64, None, 0), (8, None, 0)],
    }


def test_count_stores_tells_per_warp_partials_by_their_line():
    stores = cuda_check.parse_sass_stores(SAMPLE)["_Z6packedv"]
    counts, warp = cuda_check.count_stores(stores, range(70, 80))
    assert (counts, warp) == ({128: 1, 64: 0, 32: 1, 16: 0, 8: 0}, 1)
    counts, warp = cuda_check.count_stores(stores, range(80, 90))  # line 75 outside warp_sum_to
    assert (counts[32], warp) == (2, 0)


def test_warp_sum_to_lines_hold_its_store():
    with open(os.path.join(ROOT, "csrc", cuda_check.WARP_SUM_FILE)) as f:
        text = f.read()
    lines = cuda_check.function_lines(text, cuda_check.WARP_SUM_SIGNATURE)
    source = text.splitlines()
    assert cuda_check.WARP_SUM_SIGNATURE in source[lines[0] - 1]
    assert source[lines[-1] - 1] == "}"
    assert any("*out = value" in source[n - 1] for n in lines)
    assert not any("run_on_host" in source[n - 1] for n in lines)


@pytest.mark.parametrize(
    "name, pixels",
    [
        ("LogitBackwardKernel<float, 4>", 4),
        ("LogitBackwardKernel<BFloat16, 1>", 1),
        ("LogitForwardKernel<Half, SamePixels<Half, 8>>", 8),
        ("LogitForwardKernel<float, UpsampledPixel<float>>", None),
        ("SpatialEnergyKernel<2>", 2),
        ("EnergyKernel<8>", None),  # rows, not pixels: one pixel per thread
        ("StructuredBackwardKernel<double, 2>", 2),
        ("ChannelSumKernel<float>", None),
        ("finish_forward_kernel<float, float>", None),
    ],
)
def test_pixels_per_thread(name, pixels):
    assert cuda_check.pixels_per_thread(name) == pixels


def _record(short, **stores):
    counts = dict.fromkeys(cuda_check.STORE_WIDTHS, 0)
    counts.update({int(bits[1:]): n for bits, n in stores.items()})
    return {"short": short, "stores": counts, "warp_stores": 0}


def test_narrow_stores_count_only_in_packed_kernels():
    assert cuda_check.narrow_packed_stores(_record("LogitBackwardKernel<float, 4>", b128=5)) == 0
    assert cuda_check.narrow_packed_stores(_record("LogitBackwardKernel<float, 4>", b128=1, b32=4, b64=2)) == 6
    assert cuda_check.narrow_packed_stores(_record("LogitBackwardKernel<float, 1>", b32=4)) == 0
    assert cuda_check.narrow_packed_stores(_record("GroupSumKernel<float>", b32=1)) == 0


def test_unmatched_packed_templates_names_the_stale_ones():
    kernels = [{"short": f"{name}<float, 4>"} for name in cuda_check.PACKED_TEMPLATES[1:]]
    kernels.append({"short": f"{cuda_check.PACKED_TEMPLATES[0]}<float, 1>"})  # unpacked only
    assert cuda_check.unmatched_packed_templates(kernels) == [cuda_check.PACKED_TEMPLATES[0]]


def test_kept_cubins_by_architecture(tmp_path):
    for name in ("k.compute_80.cubin", "k.compute_90.cubin", "k.ptx"):
        (tmp_path / name).write_text("")
    assert cuda_check.kept_cubins(str(tmp_path), ["80", "90"]) == {
        "sm_80": str(tmp_path / "k.compute_80.cubin"),
        "sm_90": str(tmp_path / "k.compute_90.cubin"),
    }
    single = tmp_path / "one"
    single.mkdir()
    (single / "k.cubin").write_text("")  # nvcc's name with one architecture
    assert cuda_check.kept_cubins(str(single), ["90"]) == {"sm_90": str(single / "k.cubin")}
    assert cuda_check.kept_cubins(str(single), ["80", "90"]) == {}
