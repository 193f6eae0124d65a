"""Per-kernel figures from Nsight Compute's CSV (`ncu --csv --metrics ...`), for tools/gpu_check.py.

ncu prints one row per kernel launch and metric ("ID", ..., "Kernel Name", ..., "Metric Name",
"Metric Unit", "Metric Value"; some versions add "Kernel Time" or leave out the block and grid
sizes) after its own "==PROF==" lines and the program's output; `parse`
keeps the rows of METRICS, converts their units to bytes, seconds and percent, and returns one
record per launch in launch order.
"""

import csv
import re

# ncu metric -> the record's key.
METRICS = {
    "gpu__time_duration.sum": "time_s",
    "dram__bytes_read.sum": "read_bytes",
    "dram__bytes_write.sum": "write_bytes",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "launch__registers_per_thread": "registers",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
}
# Units as ncu prints them (`--print-units base` gives the first of each kind).
UNIT_SCALE = {
    "byte": 1,
    "Kbyte": 1e3,
    "Mbyte": 1e6,
    "Gbyte": 1e9,
    "Tbyte": 1e12,
    "nsecond": 1e-9,
    "usecond": 1e-6,
    "msecond": 1e-3,
    "second": 1,
    "%": 1,
    "register/thread": 1,
    "": 1,
}


def _value(text, unit, metric):
    if unit not in UNIT_SCALE:
        raise ValueError(f"ncu metric {metric}: unknown unit {unit!r}")
    try:
        return float(text.replace(",", "")) * UNIT_SCALE[unit]
    except ValueError:
        raise ValueError(f"ncu metric {metric}: value {text!r} is not a number") from None


def parse(text):
    """[{"id", "kernel", "grid", "block", and the METRICS keys that ncu reported}] in launch order.
    Lines before ncu's header (its log, the program's output) are skipped; no header: []."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return []
    rows = csv.DictReader(line for line in lines[start:] if line.startswith('"'))
    kernels = {}
    for row in rows:
        key = METRICS.get(row.get("Metric Name"))
        if key is None:
            continue
        record = kernels.setdefault(
            row["ID"],
            {
                "id": int(row["ID"]),
                "kernel": row["Kernel Name"],
                "grid": row.get("Grid Size", ""),
                "block": row.get("Block Size", ""),
            },
        )
        record[key] = _value(row["Metric Value"], row["Metric Unit"], row["Metric Name"])
    return sorted(kernels.values(), key=lambda record: record["id"])


def short_name(kernel):
    """'void incseg::run_on_device<incseg::logit::LogitForwardKernel<float>>(...)' -> 'LogitForwardKernel<float>'."""
    name = re.sub(r"^void ", "", kernel)
    depth, cut = 0, len(name)
    for i, char in enumerate(name):  # drop the parameter list: the first '(' outside template brackets
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    wrapped = re.fullmatch(r"(?:\w+::)*run_on_device<(.*)>", name)
    if wrapped:
        name = wrapped.group(1)
    return re.sub(r"\b\w+::", "", name)


def format_table(kernels, limit=60):
    """Summary lines: one per launch (at most `limit`), the achieved DRAM traffic and rate."""
    lines = [f"  {'kernel':<44}{'us':>9}{'MB read':>9}{'MB wrtn':>9}{'GB/s':>7}{'%peak':>6}{'regs':>5}{'occ%':>6}"]
    for k in kernels[:limit]:
        seconds = k.get("time_s")
        moved = k.get("read_bytes", 0) + k.get("write_bytes", 0)
        rate = f"{moved / seconds / 1e9:7.0f}" if seconds else f"{'-':>7}"
        lines.append(
            f"  {short_name(k['kernel'])[:43]:<44}{_cell(seconds, 1e6, 9, 1)}{_cell(k.get('read_bytes'), 1e-6, 9, 1)}"
            f"{_cell(k.get('write_bytes'), 1e-6, 9, 1)}{rate}{_cell(k.get('dram_pct'), 1, 6, 0)}"
            f"{_cell(k.get('registers'), 1, 5, 0)}{_cell(k.get('occupancy_pct'), 1, 6, 0)}"
        )
    if len(kernels) > limit:
        lines.append(f"  ... and {len(kernels) - limit} more launches (ncu.csv)")
    return lines


def _cell(value, scale, width, digits):
    return f"{'-':>{width}}" if value is None else f"{value * scale:>{width}.{digits}f}"
