"""benchmarks/targets.py: the GPU targets read off benchmark results, on made-up results whose
verdicts are known and on the committed H200 run."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import targets  # noqa: E402


def row(workload, method, forward, backward=None, deterministic=None, peak=(1, 1)):
    modes = {"forward": {"status": "ok", "median_ms": forward, "peak_bytes": peak[0]}}
    if backward is not None:
        modes["forward+backward"] = {"status": "ok", "median_ms": backward, "peak_bytes": peak[1]}
    if deterministic is not None:
        modes[targets.DETERMINISTIC] = {"status": "ok", "median_ms": deterministic}
    return {"workload": workload, "method": method, "modes": modes}


def verdicts(results):
    return {name: (value, met) for name, value, _, met in targets.targets(results)}


def test_made_up_results():
    results = {"results": [
        row("sds", "naive", 50.0, 300.0, peak=(1000, 1000)),
        row("sds", "classify_then_sample", 3.0, 6.0),
        row("sds", "fused/native", 1.0, 4.0, deterministic=5.0, peak=(5, 20)),
        row("sds", "fused/triton", 0.5, 5.0, deterministic=20.0, peak=(5, 20)),
        row("keypoints", "classify_then_sample", 3.0, 12.0),
        row("keypoints", "fused/native", 1.0, 2.0, deterministic=4.0)],
        "feature_copy": {"sds": {"median_ms": 0.1}}}
    got = verdicts(results)
    # Each mode's fastest fused backend: triton forward (0.5 ms), native forward+backward (4 ms).
    assert got["sds forward >= 3x classify_then_sample"] == (6.0, True)
    assert got["sds forward+backward >= 3x classify_then_sample"] == (1.5, False)
    assert got["keypoints forward+backward >= 3x classify_then_sample"] == (6.0, True)
    assert got["sds forward >= 100x naive"] == (100.0, True)
    assert got["sds forward+backward >= 100x naive"] == (75.0, False)
    assert got["sds forward peak memory <= 1/100 of naive"] == (200.0, True)
    assert got["sds forward+backward peak memory <= 1/100 of naive"] == (50.0, False)
    # Deterministic: the backend fastest in forward+backward, (det - fwd) / (fwd+bwd - fwd).
    assert got["sds deterministic backward <= 1.5x default (fused/native)"] == (4.0 / 3.0, True)
    assert got["keypoints deterministic backward <= 1.5x default (fused/native)"] == (3.0, False)
    assert got["stretch: sds forward <= 4x one copy of the features"] == (5.0, False)


def test_missing_measurements_are_said(tmp_path):
    results = {"settings": {"dtype": "float32"}, "results": [row("sds", "fused/native", 1.0)]}
    assert verdicts(results)["sds forward >= 3x classify_then_sample"] == (None, None)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert "| float32 | sds forward >= 3x classify_then_sample | not measured | - |" in targets.table([str(path)])


def test_committed_h200_run():
    """The verdicts of the committed H200 results (benchmarks/results/gpu/README.md quotes them)."""
    table = targets.table([os.path.join(ROOT, "benchmarks", "results", "gpu", "float32", "results.json")])
    assert "| float32 | sds forward >= 3x classify_then_sample | 11.9x | yes |" in table
    assert "| float32 | parts deterministic backward <= 1.5x default (fused/native) | 1.74x | **no** |" in table
