"""The GPU targets (issue 4) read off ``benchmarks/run.py`` results: each target, the measured
value and whether it is met, as a Markdown table.

    python benchmarks/targets.py RESULTS.json [RESULTS.json ...]   (one per dtype)

Targets: the fastest fused backend at least 3x faster than ``classify_then_sample`` on sds and
keypoints, forward and forward+backward; at least 100x faster than ``naive`` on sds, with at most
1/100 of its peak memory; a deterministic backward within 1.5x of the default backward (every
workload, the fastest fused backend); stretch: the sds forward within 4x of one device-to-device
copy of the feature maps.
"""

import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

from summary import MODES, significant

DETERMINISTIC = "forward+backward, deterministic"


def _mode(row: Dict, mode: str) -> Dict:
    entry = row["modes"].get(mode, {})
    return entry if entry.get("status") == "ok" else {}


def _fastest_fused(rows: List[Dict], mode: str) -> Optional[Dict]:
    fused = [r for r in rows if r["method"].startswith("fused/") and _mode(r, mode)]
    return min(fused, key=lambda r: _mode(r, mode)["median_ms"], default=None)


def _row(rows: List[Dict], method: str) -> Optional[Dict]:
    return next((r for r in rows if r["method"] == method), None)


def targets(results: Dict) -> Iterator[Tuple[str, Optional[float], str, Optional[bool]]]:
    """(target, measured value, how it is written, met) for one results.json; value None where
    the run did not measure it."""
    by_workload: Dict[str, List[Dict]] = {}
    for row in results["results"]:
        by_workload.setdefault(row["workload"], []).append(row)

    def speedup(workload: str, baseline: str, mode: str) -> Optional[float]:
        rows = by_workload.get(workload, [])
        base, best = _row(rows, baseline), _fastest_fused(rows, mode)
        if base is None or best is None or not _mode(base, mode):
            return None
        return _mode(base, mode)["median_ms"] / _mode(best, mode)["median_ms"]

    for workload in ("sds", "keypoints"):
        for mode in MODES:
            value = speedup(workload, "classify_then_sample", mode)
            yield f"{workload} {mode} >= 3x classify_then_sample", value, "x", None if value is None else value >= 3
    for mode in MODES:
        value = speedup("sds", "naive", mode)
        yield f"sds {mode} >= 100x naive", value, "x", None if value is None else value >= 100
    sds = by_workload.get("sds", [])
    for mode in MODES:
        naive, best = _row(sds, "naive"), _fastest_fused(sds, mode)
        ratio = None
        if naive is not None and best is not None and _mode(naive, mode).get("peak_bytes"):
            ratio = _mode(best, mode)["peak_bytes"] / _mode(naive, mode)["peak_bytes"]
        yield (f"sds {mode} peak memory <= 1/100 of naive", None if ratio is None or ratio == 0 else 1 / ratio,
               "1/", None if ratio is None else ratio <= 0.01)
    for workload, rows in by_workload.items():
        best = _fastest_fused(rows, "forward+backward")
        if best is None or not _mode(best, DETERMINISTIC) or not _mode(best, "forward"):
            continue
        forward = _mode(best, "forward")["median_ms"]
        default = _mode(best, "forward+backward")["median_ms"] - forward
        value = (_mode(best, DETERMINISTIC)["median_ms"] - forward) / default if default > 0 else None
        yield (f"{workload} deterministic backward <= 1.5x default ({best['method']})", value, "x",
               None if value is None else value <= 1.5)
    copy = results.get("feature_copy", {}).get("sds")
    best = _fastest_fused(sds, "forward")
    if copy and best is not None:
        value = _mode(best, "forward")["median_ms"] / copy["median_ms"]
        yield "stretch: sds forward <= 4x one copy of the features", value, "x", value <= 4


def table(paths: List[str]) -> str:
    lines = ["| dtype | target | measured | met |", "|---|---|---:|---|"]
    for path in paths:
        if not os.path.exists(path):  # a benchmark step that failed or ran out of time
            lines.append(f"| - | no results at {path} | - | - |")
            continue
        with open(path) as handle:
            results = json.load(handle)
        dtype = results["settings"]["dtype"]
        for name, value, unit, met in targets(results):
            written = "not measured" if value is None else (
                f"1/{significant(value)}" if unit == "1/" else f"{significant(value)}x")
            verdict = "-" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {dtype} | {name} | {written} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table(sys.argv[1:]))
