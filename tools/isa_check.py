"""Are the CPU kernels' ISA copies vectorised? Read from the built extension's machine code.

    python tools/isa_check.py [path/to/_C.so]

Every hot loop of the CPU kernels is a kernel struct that cpu::run_best (csrc/cpu/toolkit.h) compiles
three times: run_baseline, run_avx2 and run_avx512. Their loops are plain C++ left to GCC's
vectoriser, which can give up on one copy while it vectorises another (a select it will not
if-convert for AVX2, say): that copy then runs scalar code at a fraction of its speed, and only a
benchmark on that ISA would show it. This reads each copy's disassembly (objdump) and counts its
floating-point arithmetic instructions: packed ones (ps/pd, vector work on any register width)
against scalar ss/sd ones (a vectorised loop keeps a scalar remainder loop, and a kernel has
per-pixel scalar parts, so no copy is all packed). A copy whose loops were left scalar shows a
packed share of a few percent where its vectorised twin shows 40-70%. The rule: each AVX2 copy's
packed share is at least SHARE_OF_WIDEST of its AVX-512 copy's, and at least MIN_PACKED_SHARE for
kernels whose widest copy is AVX2. Float64 kernels call libm's exp and log and are not vectorised in
any copy: they are not checked.
"""

import collections
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("baseline", "avx2", "avx512")
SHARE_OF_WIDEST = 0.4
MIN_PACKED_SHARE = 0.15

# A copy's function, or one of GCC's clones of it (" [clone .isra.0]", " [clone .cold]").
_FUNCTION = re.compile(r"^[0-9a-f]+ <void incseg::cpu::run_(baseline|avx2|avx512)<(.*)>:$")
_FLOAT_ARITHMETIC = re.compile(
    r"\sv?(?:add|sub|mul|div|max|min|f[n]?m(?:add|sub)\d*|sqrt|cmp\w*|blendv|round)(ps|pd|ss|sd)\s"
)


@dataclasses.dataclass
class Copy:
    packed: int = 0
    scalar: int = 0

    @property
    def packed_share(self):
        total = self.packed + self.scalar
        return self.packed / total if total else 0.0


def _first_template_argument(text):
    depth = 0
    for i, char in enumerate(text):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if depth == 0 and char == ",":
            return text[:i].replace("incseg::(anonymous namespace)::", "")
    return text


def kernel_copies(so_path):
    """{kernel (its template arguments as written): {isa: Copy}} from the disassembly of so_path."""
    objdump = shutil.which("objdump")
    if objdump is None:
        raise RuntimeError("objdump (binutils) is needed to read the kernels' machine code")
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", so_path], capture_output=True, text=True, check=True
    ).stdout
    copies = collections.defaultdict(dict)
    current = None
    for line in listing.splitlines():
        head = _FUNCTION.match(line)
        if head:
            isa, kernel = head.group(1), _first_template_argument(head.group(2))
            current = copies[kernel].setdefault(isa, Copy())
            continue
        if not line.strip():
            current = None
            continue
        op = _FLOAT_ARITHMETIC.search(line) if current is not None else None
        if op:
            if op.group(1) in ("ss", "sd"):
                current.scalar += 1
            else:
                current.packed += 1
    return copies


def _is_float64(kernel):
    return re.search(r"<double\b", kernel) is not None


def failures(copies):
    """One line per vectorised copy whose packed share falls below the rule of the module docstring."""
    found = []
    for kernel, by_isa in sorted(copies.items()):
        if _is_float64(kernel) or "avx2" not in by_isa:
            continue
        avx2 = by_isa["avx2"].packed_share
        if "avx512" in by_isa:
            widest = by_isa["avx512"].packed_share
            if avx2 < SHARE_OF_WIDEST * widest:
                found.append(f"{kernel}: AVX2 copy {avx2:.0%} packed, AVX-512 copy {widest:.0%}")
        elif avx2 < MIN_PACKED_SHARE:
            found.append(f"{kernel}: AVX2 copy {avx2:.0%} packed (< {MIN_PACKED_SHARE:.0%})")
    return found


def built_extension():
    found = sorted(glob.glob(os.path.join(ROOT, "incseg_fast", "_C*.so")))
    if not found:
        raise SystemExit("isa_check: no incseg_fast/_C*.so: build the extension first (make setup)")
    return found[0]


def main(argv):
    so_path = argv[0] if argv else built_extension()
    copies = kernel_copies(so_path)
    for kernel, by_isa in sorted(copies.items()):
        shares = "  ".join(
            f"{isa} {by_isa[isa].packed_share:4.0%} of {by_isa[isa].packed + by_isa[isa].scalar:5d}"
            if isa in by_isa
            else f"{isa} {'-':>13}"
            for isa in ISAS
        )
        print(f"{kernel[:90]:<90} {shares}")
    bad = failures(copies)
    for line in bad:
        print(f"FAIL {line}")
    print(f"isa_check: {len(copies)} kernels, {len(bad)} with a copy left scalar")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
