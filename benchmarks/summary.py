"""The README's performance table from a ``benchmarks/run.py`` results.json: per workload and
baseline, the baseline's and the fastest fused backend's median times and the speed-up.

    python benchmarks/summary.py benchmarks/results/cpu/results.json
"""

import json
import math
import sys
from typing import Dict, List, Optional

MODES = ("forward", "forward+backward")


def significant(value: float) -> str:
    """Three significant digits, no exponent, thousands separated: 3,300, 41.2, 6.60, 0.0434."""
    if value <= 0 or not math.isfinite(value):
        return f"{value:.1f}"
    return f"{value:,.{min(max(2 - math.floor(math.log10(value)), 0), 6)}f}"


def _ms(mode: Dict) -> Optional[float]:
    return mode.get("median_ms") if mode.get("status") == "ok" else None


def summary(results: Dict) -> str:
    """Markdown rows: workload, operator, baseline, then per mode baseline ms, fused ms, speed-up
    (baselines that ran in neither mode are left out)."""
    by_workload: Dict[str, List[Dict]] = {}
    for row in results["results"]:
        by_workload.setdefault(row["workload"], []).append(row)
    lines = ["| workload | operator | baseline | baseline fwd ms | fused fwd ms | speed-up fwd "
             "| baseline fwd+bwd ms | fused fwd+bwd ms | speed-up fwd+bwd |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for workload, rows in by_workload.items():
        fused = [r for r in rows if r["method"].startswith("fused/")]
        best = {mode: min((t for t in (_ms(r["modes"].get(mode, {})) for r in fused) if t is not None),
                          default=None) for mode in MODES}
        for row in rows:
            if row["method"].startswith("fused/") or all(_ms(row["modes"].get(m, {})) is None for m in MODES):
                continue
            cells = [workload, f"`{row['op']}`", row["method"]]
            for mode in MODES:
                base = _ms(row["modes"].get(mode, {}))
                if base is None or best[mode] is None:
                    cells += [row["modes"].get(mode, {}).get("status", "-"), "", ""]
                else:
                    cells += [significant(base), significant(best[mode]), f"**{significant(base / best[mode])}x**"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(summary(json.load(handle)))
