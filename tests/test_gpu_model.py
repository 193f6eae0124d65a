"""tools/gpu_model.py's arithmetic and SASS loop reading, on small samples: no nvcc, no GPU."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_model", os.path.join(ROOT, "tools", "gpu_model.py"))
gpu_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_model)


@pytest.mark.parametrize(
    "registers, warps",
    [
        (26, 64),  # 1024 registers per warp: the 64-warp limit
        (64, 32),  # 2048 per warp: 32 warps
        (77, 24),  # 2560 per warp: 25 warps fit, whole 4-warp blocks: 24
        (128, 16),
        (160, 12),
        (255, 8),
    ],
)
def test_resident_warps(registers, warps):
    assert gpu_model.resident_warps(registers) == warps


def test_resident_warps_counts_whole_blocks():
    assert gpu_model.resident_warps(77, block_threads=32) == 25
    assert gpu_model.resident_warps(16, block_threads=32) == 32 * 1  # the 32-block limit


def test_modelled_seconds_takes_the_slower_of_memory_and_issue():
    issue_rate = 132 * 4 * 1.755e9
    assert gpu_model.ISSUE_RATE == pytest.approx(issue_rate)
    assert gpu_model.modelled_seconds(3.0e12, 1.0) == (pytest.approx(1.0), "memory")
    assert gpu_model.modelled_seconds(3.0e9, 2 * issue_rate) == (pytest.approx(2.0), "issue")


@pytest.mark.parametrize(
    "opcode, bits",
    [("LDG.E.128", 128), ("LDG.E", 32), ("LDG.E.64.CONSTANT", 64), ("LDG.E.U16", 16), ("LDG.E.U8", 8),
     ("LDS.128", None), ("STG.E.128", None)],
)  # fmt: skip
def test_load_bits(opcode, bits):
    assert gpu_model.load_bits(opcode) == bits


# Two nested loops in one function: the outer one (.L_x_1) holds the inner one (.L_x_2), whose body
# (label to back-branch) is 5 instructions with two 128-bit loads; the source lines name the `for`.
SAMPLE = """\
.text._Z1kv:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
\t//## File "/src/k.cuh", line 10 inlined at "/src/launch.cuh", line 14
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_2:
\t//## File "/src/k.cuh", line 12
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   FADD R4, R4, R8 ;
        /*0050*/                   STG.E.128 desc[UR4][R2.64], R4 ;
\t//## File "/src/k.cuh", line 11
        /*0060*/              @P0 BRA `(.L_x_2) ;
\t//## File "/src/k.cuh", line 10
        /*0070*/              @P1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""


def _loops():
    instructions, labels = gpu_model.parse_sass(SAMPLE)["_Z1kv"]
    return instructions, labels, gpu_model.innermost_loops(instructions, labels)


def test_innermost_loops_from_label_to_back_branch():
    instructions, labels, loops = _loops()
    assert len(instructions) == 10
    assert labels == {".L_x_1": 1, ".L_x_2": 2, ".L_x_3": 9}
    inner, spin = loops  # the outer loop holds the inner one: not innermost
    assert (inner.first, inner.last, inner.instructions) == (2, 6, 5)
    assert inner.source == ("/src/k.cuh", 11)
    assert inner.loads == {128: 2}
    assert spin.instructions == 1


def _source_text(path, line):
    return {11: "    for (int64_t c = 1; c < in.Co; ++c) {"}.get(line, "")


def test_elements_per_iteration_from_the_loads_of_a_channel():
    *_, loops = _loops()
    one_load = gpu_model.LoopSpec("c < in.Co", 1.0, 128, 1, pixels=4)
    two_loads = gpu_model.LoopSpec("c < in.Co", 1.0, 128, 2, pixels=4)
    loop = gpu_model.match_loop(loops, two_loads, _source_text)
    assert gpu_model.elements_per_iteration(loop, one_load) == 8  # two channels of 4 pixels
    assert gpu_model.elements_per_iteration(loop, two_loads) == 4
    assert gpu_model.elements_per_iteration(loop, gpu_model.LoopSpec("c < in.Co", 1.0, fixed=8)) == 8
    with pytest.raises(ValueError, match="not whole channels"):
        gpu_model.elements_per_iteration(loop, gpu_model.LoopSpec("c < in.Co", 1.0, 128, 3))
    with pytest.raises(LookupError, match="c < in.C;"):
        gpu_model.match_loop(loops, gpu_model.LoopSpec("c < in.C;", 1.0, 128, 1), _source_text)


def test_model_row_counts_loops_by_iteration_and_the_rest_once_per_thread():
    function = gpu_model.parse_sass(SAMPLE)["_Z1kv"]
    threads, elements = 1e6, 4e9
    spec = gpu_model.LoopSpec("c < in.Co", elements, 128, 2, pixels=4)
    case = gpu_model.KernelCase("k", "K<float, 4>", "shape", "fp32", threads, 1e6, 100.0, 80.0, [spec])
    row = gpu_model.model_row(case, function, 64, _source_text)
    thread_instructions = (10 - 5) * threads + 5 * elements / 4  # 5 outside the loop, 5 per 4 elements
    issue = thread_instructions / 32 / gpu_model.ISSUE_RATE
    memory = 100.0 * 1e6 / 3.0e12
    assert (row.seconds, row.bound) == (pytest.approx(max(issue, memory)), "issue")
    assert row.per_element == [pytest.approx(5 / 4)]
    assert row.roofline == pytest.approx(memory / issue)
    assert (row.registers, row.warps) == (64, 32)
    assert "| k | shape | fp32 | 64 | 32 | 1 | 100 (80) |" in gpu_model.format_table([row])


def test_attention_groups_fill_whole_waves():
    # 24 images of 64 x 64 at 4 pixels per thread: 192 blocks. MomentsKernel's 96 registers: 5 blocks
    # per SM, 660 at once: 10 groups (1920 blocks, 2.9 waves) beat 3 (0.87 of a wave) and 16 (4.65).
    assert gpu_model.resident_blocks(96) == 660
    assert gpu_model.attention_groups(24, 2048, 4096, 4, 96) == 10
    # 8 images: 64 blocks; 10 groups fill 640 of 660, where 11 would start a second wave.
    assert gpu_model.attention_groups(8, 2048, 4096, 4, 96) == 10
    assert gpu_model.attention_groups(24, 100, 4096, 4, 96) == 1  # fewer than 128 channels: one group
    assert gpu_model.attention_groups(24, 2048, 512 * 512, 4, 96) == 1  # a wave without groups


def test_channel_groups_take_the_fewest_on_a_tie():
    assert gpu_model.channel_groups(blocks=100, resident=300, most=16) == 3  # one full wave
    assert gpu_model.channel_groups(blocks=100, resident=300, most=2) == 2
    assert gpu_model.channel_groups(blocks=300, resident=300, most=16) == 1


def test_cell_strips_follow_the_launch_plan():
    # cell_strips of logit_losses_kernels.cuh: ceil(ceil(out / in) / 4) strips of 4 rows per row cell.
    assert gpu_model.cell_strips(64, 512) == 2  # stride 8
    assert gpu_model.cell_strips(32, 512) == 4  # stride 16
    assert gpu_model.cell_strips(7, 16) == 1  # cells of 2 or 3 rows
    assert gpu_model.cell_strips(3, 31) == 3  # cells of 10 or 11 rows


def test_upsampled_backward_rows_and_the_comparison_with_interpolate():
    """The size= backward is modelled as its kernels; the comparison adds the size= rows of a shape and
    dtype against interpolate (by its bytes) plus the fused logit kernels at full resolution."""
    cases = gpu_model.upsampled_cases(8, "voc512", "fp32", 8) + gpu_model.interpolate_cases(8, "voc512", "fp32", 8)
    labels = [c.label for c in cases]
    assert labels == ["size= forward", "size= backward: old cells", "size= backward: new cells",
                      "size= backward: gather", "interpolate x, y", "interpolate backward"]  # fmt: skip
    pixels = 8 * 512 * 512
    interpolate = cases[4]
    assert interpolate.bytes_per_pixel == pytest.approx((21 + 16) * 4 * (1 + 1 / 64))
    rows = [gpu_model.memory_row(c) for c in cases[4:]]
    assert rows[0].seconds == pytest.approx(interpolate.bytes_per_pixel * pixels / 3.0e12)
    timed = {"size= forward": 3e-4, "size= backward: old cells": 1e-4, "size= backward: new cells": 4e-5,
             "size= backward: gather": 1e-5, "logit forward": 2e-4, "logit backward": 1.5e-4}  # fmt: skip
    fake = [gpu_model.Row(c, 0, 0, [], timed[c.label], "issue", 0.0) for c in cases[:4]]
    full = [gpu_model.KernelCase(label, "K", "voc512", "fp32", 1, 1, 1, 1, [])
            for label in ("logit forward", "logit backward")]  # fmt: skip
    fake += [gpu_model.Row(c, 0, 0, [], timed[c.label], "issue", 0.0) for c in full]
    table = gpu_model.format_comparison(fake + rows)
    fused = 3e-4 + 1e-4 + 4e-5 + 1e-5
    unfused = rows[0].seconds + rows[1].seconds + 2e-4 + 1.5e-4
    assert f"| voc512_s8 | fp32 | {fused * 1e3:.3f} | {unfused * 1e3:.3f} | {fused / unfused:.2f} |" in table
