"""The per-layer choice of evaluation order (hypercolumn_ops/planning.py): the two cost
estimates as the module docstring counts them, the cheaper one chosen, and the order for
symbolic sizes equal to the one the estimates reach as points grow."""

import itertools

import pytest

from hypercolumn_ops import planning


def test_costs_follow_the_count():
    # One layer (B, C, H, W) = (2, 64, 10, 12); 500 points; NC = 3, KK = 9 (4 cells hit), M = 2.
    (plan,) = planning.plan_layers([(2, 64, 10, 12)], 500, 3, 9, 2, "cpu")
    assert plan.sample_cost == 500 * 64 * (4 + 4 * 2)
    speedup = planning.GEMM_SPEEDUP["cpu"]
    assert plan.project_cost == pytest.approx(2 * 10 * 12 * 64 * 3 * 9 * 2 / speedup + 500 * 4 * 4 * 2, rel=1e-15)
    assert plan.order == planning.PROJECT_SCORES and plan.name == "project_scores"


def test_few_points_on_a_large_map_sample_features():
    few, many = (planning.plan_layers([(1, 256, 128, 128)], points, 1, 25, 1, "cuda")[0] for points in (10, 10**6))
    assert few.order == planning.SAMPLE_FEATURES and few.name == "sample_features"
    assert many.order == planning.PROJECT_SCORES


@pytest.mark.parametrize("channels, cells, outputs", list(itertools.product((1, 2, 3, 64), (1, 4, 9, 25), (1, 2, 17))))
def test_many_points_order_is_the_limit_of_the_estimates(channels, cells, outputs):
    plans = planning.plan_layers([(2, channels, 40, 40)], 10**15, 1, cells, outputs, "cpu")
    assert planning.many_points_order(channels, cells, outputs) == plans[0].order
