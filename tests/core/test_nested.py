"""NestFL's math by hand: partition-wise aggregation, the Gompertz mapping, angles, nesting, rates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_fedprune.core.nested import (
    angle_weights,
    choose_rate,
    gompertz,
    keep_counts,
    partition_aggregate,
    progressive_plans,
    update_angle,
)
from lightning_fedprune.core.plans import Planner
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.models import create_model, list_models, model_info


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.body(x)))


@pytest.fixture
def planner():
    return Planner.from_module(TwoLayer(), torch.zeros(1, 3), unprunable=("classifier",))


def _const(model_state, value):
    return {k: torch.full_like(v, value) for k, v in model_state.items()}


def test_partition_aggregation_by_hand(planner):
    # Prepare: nested plans C ⊂ B ⊂ A over the 4 hidden units: A keeps all, B {0, 1, 3}, C {1}
    shapes = {k: torch.zeros(s) for k, s in planner.layout.shapes.items()}
    glob = _const(shapes, 0.0)
    a, b, c = (planner.plan_from_indices([idx]) for idx in ([0, 1, 2, 3], [0, 1, 3], [1]))
    # each client trained its sub-model to a constant: A 1.0, B 2.0, C 4.0; samples 1, 1, 2
    trained = [p.recover(p.extract(_const(shapes, v)), base=glob) for p, v in ((a, 1.0), (b, 2.0), (c, 4.0))]
    samples = [1.0, 1.0, 2.0]
    seen = {}

    def by_samples(level, sharing, updates):
        seen[level] = list(sharing)
        return [samples[i] for i in sharing]

    # Execute
    new, sharing = partition_aggregate(glob, trained, [a, b, c], by_samples)
    # Assert: partition 0 = unit 1 (all three): (1*1 + 1*2 + 2*4) / 4 = 2.75;
    # partition 1 = units 0 and 3 (A, B): (1 + 2) / 2 = 1.5; partition 2 = unit 2 (A only): 1.0
    assert seen == {0: [0, 1, 2], 1: [0, 1], 2: [0]} and sharing == seen
    expect_unit = torch.tensor([1.5, 2.75, 1.0, 1.5])
    assert torch.equal(new["body.bias"], expect_unit)
    assert torch.equal(new["body.weight"], expect_unit[:, None].expand(4, 3))
    assert torch.equal(new["classifier.weight"], expect_unit[None, :].expand(2, 4))
    assert torch.equal(new["classifier.bias"], torch.full((2,), 2.75))  # every client has the classifier's bias


def test_positions_no_client_trained_keep_their_values(planner):
    shapes = {k: torch.zeros(s) for k, s in planner.layout.shapes.items()}
    glob = _const(shapes, 9.0)
    b, c = planner.plan_from_indices([[0, 1, 3]]), planner.plan_from_indices([[1]])
    trained = [p.recover(p.extract(_const(shapes, v)), base=glob) for p, v in ((b, 2.0), (c, 4.0))]
    new, _ = partition_aggregate(glob, trained, [b, c], lambda lvl, sharing, upd: [1.0] * len(sharing))
    assert torch.equal(new["body.bias"], torch.tensor([2.0, 3.0, 9.0, 2.0]))  # unit 2: nobody had it
    assert torch.equal(new["body.weight"][2], torch.full((3,), 9.0))


def test_gompertz_mapping_by_hand():
    alpha = 5.0
    for theta in (0.0, 0.5, 1.0, math.pi / 2):
        by_hand = alpha * (1 - math.exp(-math.exp(-alpha * (theta - 1))))
        assert float(gompertz(theta, alpha)) == pytest.approx(by_hand, rel=1e-12)
    assert float(gompertz(1.0, alpha)) == pytest.approx(5 * (1 - math.exp(-1)), rel=1e-12)  # 3.16060...
    assert float(gompertz(0.0, alpha)) > float(gompertz(math.pi / 2, alpha))  # aligned updates weigh more


def test_angle_weights_by_hand():
    u1, u2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    agg = (u1 + u2) / 2  # equal samples
    t1, t2 = update_angle(u1, agg), update_angle(u2, agg)
    assert t1 == pytest.approx(math.acos(1.0 / math.sqrt(1.25)))  # 0.46365 rad
    assert t2 == pytest.approx(math.acos(1.5 / (math.sqrt(2.0) * math.sqrt(1.25))))  # 0.32175 rad
    e1 = math.exp(5 * (1 - math.exp(-math.exp(-5 * (t1 - 1)))))
    e2 = math.exp(5 * (1 - math.exp(-math.exp(-5 * (t2 - 1)))))
    w = angle_weights([1, 1], [t1, t2], 5.0)
    assert w == pytest.approx([e1 / (e1 + e2), e2 / (e1 + e2)])
    assert update_angle(torch.zeros(3), torch.ones(3)) == 0.0


@pytest.mark.parametrize("name", [m for m in list_models() if model_info(m).task == "classification"])
def test_progressive_plans_are_nested_with_absolute_keep_counts(name):
    info = model_info(name)
    torch.manual_seed(0)
    model = create_model(name)
    planner = Planner.from_module(model, info.example_input(1), unprunable=info.unprunable)
    state = model.state_dict()
    rates = [0.6, 0.0, 0.3, 0.3]
    plans = progressive_plans(planner, state, rates)
    assert list(plans) == [0.0, 0.3, 0.6]
    for r, p in plans.items():
        assert list(p.kept_counts) == keep_counts(planner, r)  # absolute: no drift
    for small, large in ((plans[0.6], plans[0.3]), (plans[0.3], plans[0.0])):
        for key in state:
            assert bool((small.mask(key) <= large.mask(key)).all()), key  # nested


def test_choose_rate_takes_the_smallest_rate_that_fits():
    seconds = {0.0: 10.0, 0.25: 7.0, 0.5: 4.0, 0.75: 2.0}
    memory = {0.0: 100.0, 0.25: 60.0, 0.5: 30.0, 0.75: 10.0}
    pick = lambda budget, mem: choose_rate([0.75, 0.0, 0.5, 0.25], seconds=seconds.get, memory=memory.get, budget_s=budget, memory_limit=mem)  # noqa: E731
    assert pick(10.0, None) == 0.0
    assert pick(5.0, None) == 0.5
    assert pick(10.0, 50.0) == 0.5  # time would allow 0.0, memory does not
    assert pick(1.0, None) is None


def test_rates_outside_the_range_are_refused(planner):
    with pytest.raises(ConfigError, match=r"a pruning rate must be in \[0, 1\), got 1.0"):
        keep_counts(planner, 1.0)
