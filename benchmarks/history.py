"""Append a ``benchmarks/run.py`` results.json to the results history, one CSV row per workload
and method: when, where, which code, the median times, the fused speed-up and the peak memory.

    python benchmarks/history.py benchmarks/results/gpu/results.json
    python benchmarks/history.py RESULTS.json --commit c08c2a7 --note "run 2 of the day"

Rows already in the history (same date, machine, dtype, workload and method) are not added
again, so a results file may be appended twice. ``--commit`` records the code that ran where the
results file's own commit is wrong (a machine whose copy of ``.git`` was older than its tree).

Columns: ``fwd_ms``, ``fwd_bwd_ms`` and ``det_fwd_bwd_ms`` (forward+backward under
``torch.use_deterministic_algorithms(True)``, CUDA only) are medians in ms; ``fwd_speedup`` and
``fwd_bwd_speedup`` the method's time over the fastest fused backend's (so 1.0 for that backend);
``fwd_peak_mib`` and ``fwd_bwd_peak_mib`` the peak memory of the call (CUDA: allocated; CPU: the
resident-set growth of a fresh process), MiB; ``rel_error`` ``||out - ref|| / ||ref||`` against the
float64 reference. An empty cell: not run, not measured or not applicable.
"""

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
HISTORY = os.path.join(HERE, "results", "history.csv")
COLUMNS = ["date", "machine", "device", "dtype", "commit", "torch", "set", "workload", "op", "method",
           "fwd_ms", "fwd_bwd_ms", "det_fwd_bwd_ms", "fwd_speedup", "fwd_bwd_speedup", "fwd_peak_mib",
           "fwd_bwd_peak_mib", "rel_error", "note"]
KEY = ("date", "machine", "dtype", "workload", "method")
FORWARD, FORWARD_BACKWARD, DETERMINISTIC = "forward", "forward+backward", "forward+backward, deterministic"
MIB = float(1 << 20)


def machine_name(machine: Dict) -> str:
    """The GPU's name on CUDA runs, else the CPU's with its core count."""
    if machine.get("gpu"):
        return machine["gpu"]
    return f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cpu_count', '?')} cores"


def _number(value: Optional[float], digits: int = 4) -> str:
    """Four significant digits (times, speed-ups, MiB), or empty."""
    return "" if value is None else f"{value:.{digits}g}"


def _case(row: Dict, mode: str) -> Dict:
    case = row["modes"].get(mode, {})
    return case if case.get("status") == "ok" else {}


def rows(results: Dict, commit: Optional[str] = None, note: str = "") -> List[Dict[str, str]]:
    """The history rows of one results.json."""
    machine, settings = results["machine"], results["settings"]
    common = {"date": machine["date"], "machine": machine_name(machine), "device": settings["device"],
              "dtype": settings["dtype"], "commit": commit or machine.get("hypercolumn_ops_commit") or "",
              "torch": machine.get("torch", ""), "set": settings.get("set", ""), "note": note}
    out = []
    for row in results["results"]:
        forward, both, det = _case(row, FORWARD), _case(row, FORWARD_BACKWARD), _case(row, DETERMINISTIC)
        if not (forward or both or det):
            continue  # not run in any mode (skipped, unavailable, outside the quick set)
        peak = {name: None if "peak_bytes" not in case else case["peak_bytes"] / MIB
                for name, case in (("fwd", forward), ("fwd_bwd", both))}
        error = row.get("relative_error")
        out.append(dict(common, workload=row["workload"], op=row["op"], method=row["method"],
                        fwd_ms=_number(forward.get("median_ms")), fwd_bwd_ms=_number(both.get("median_ms")),
                        det_fwd_bwd_ms=_number(det.get("median_ms")),
                        fwd_speedup=_number(forward.get("best_fused_speedup")),
                        fwd_bwd_speedup=_number(both.get("best_fused_speedup")),
                        fwd_peak_mib=_number(peak["fwd"]), fwd_bwd_peak_mib=_number(peak["fwd_bwd"]),
                        rel_error="" if error is None else f"{error:.2e}"))
    return out


def read_history(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != COLUMNS:
            raise SystemExit(f"{path}: columns {reader.fieldnames} are not {COLUMNS}")
        return list(reader)


def append(results: Dict, path: str = HISTORY, commit: Optional[str] = None, note: str = "") -> int:
    """Appends the rows of ``results`` that ``path`` does not hold yet; returns how many."""
    known = {tuple(row[k] for k in KEY) for row in read_history(path)}
    new = [row for row in rows(results, commit, note) if tuple(row[k] for k in KEY) not in known]
    exists = os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        if not exists:
            writer.writeheader()
        writer.writerows(new)
    return len(new)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files written by benchmarks/run.py")
    parser.add_argument("--history", default=HISTORY, help=f"the CSV to append to (default {HISTORY})")
    parser.add_argument("--commit", help="the commit that ran, where the results file's own is wrong")
    parser.add_argument("--note", default="", help="a remark stored with every row")
    args = parser.parse_args(argv)
    for path in args.results:
        with open(path) as handle:
            added = append(json.load(handle), args.history, args.commit, args.note)
        print(f"{path}: {added} rows added to {args.history}", file=sys.stderr)


if __name__ == "__main__":
    main()
