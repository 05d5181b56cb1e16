"""FedMP's Jetson TX2 testbed: computing modes (Table II), clusters A/B/C, Low/Medium/High."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lightning_fedprune.core.devices import (
    FEDMP_CLUSTERS,
    GPU_EFFECTIVE_UTILIZATION,
    HOST_FLOP_PER_CPU_CYCLE,
    JETSON_TX2_MODES,
    DeviceProfile,
    fedmp_device_specs,
    fedmp_devices,
    fluctuate_bandwidth,
)
from lightning_fedprune.errors import ConfigError


def test_table_two_modes_and_their_throughput():
    # Table II rows as (denver cores, GHz, A57 cores, GHz, GPU GHz)
    rows = [(m.denver_cores, m.denver_ghz, m.a57_cores, m.a57_ghz, m.gpu_ghz) for m in JETSON_TX2_MODES]
    assert rows == [(2, 2.0, 4, 2.0, 1.30), (0, 0.0, 4, 2.0, 1.12), (2, 1.4, 4, 1.4, 1.12), (0, 0.0, 4, 1.2, 0.85)]
    assert [m.mode for m in JETSON_TX2_MODES] == [0, 1, 2, 3]
    # mode 0 by hand: GPU 0.10 * 256 * 2 * 1.3e9 = 66.56 GFLOP/s, host 200 * 2.0e9 = 400 GFLOP/s (serial)
    m0 = JETSON_TX2_MODES[0]
    assert (GPU_EFFECTIVE_UTILIZATION, HOST_FLOP_PER_CPU_CYCLE) == (0.10, 200.0)
    assert m0.gpu_flops_per_second == pytest.approx(66.56e9)
    assert m0.host_flops_per_second == pytest.approx(400e9)
    assert m0.flops_per_second == pytest.approx(1 / (1 / 66.56e9 + 1 / 400e9))
    # modes 1 and 2 share the GPU clock; the faster CPU makes mode 1 the more capable
    assert JETSON_TX2_MODES[1].gpu_flops_per_second == JETSON_TX2_MODES[2].gpu_flops_per_second
    speeds = [m.flops_per_second for m in JETSON_TX2_MODES]
    assert all(a > b for a, b in zip(speeds, speeds[1:])), speeds


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [("low", {"A": 10}), ("medium", {"A": 5, "B": 5}), ("high", {"A": 3, "B": 3, "C": 4}), ("HIGH", {"A": 3, "B": 3, "C": 4})],
)
def test_scenario_composition(scenario, expected):
    specs = fedmp_device_specs(scenario, seed=0)
    assert Counter(d.cluster for d in specs) == Counter(expected)
    assert [d.client for d in specs] == list(range(len(specs)))
    # clients are numbered cluster by cluster in A, B, C order
    assert [d.cluster for d in specs] == sorted(d.cluster for d in specs)


def test_clusters_respect_their_modes_and_locations():
    specs = fedmp_device_specs({"A": 40, "B": 40, "C": 40}, seed=1, jitter=0.0)
    for d in specs:
        cluster = FEDMP_CLUSTERS[d.cluster]
        assert d.mode in cluster.modes
        assert d.location == cluster.location.name
        assert d.profile.flops_per_second == JETSON_TX2_MODES[d.mode].flops_per_second  # no jitter
        lo, hi = cluster.location.uplink_mbps
        assert lo * 1e6 / 8 <= d.profile.uplink_bytes_per_second <= hi * 1e6 / 8
        lo, hi = cluster.location.downlink_mbps
        assert lo * 1e6 / 8 <= d.profile.downlink_bytes_per_second <= hi * 1e6 / 8
    # both modes of every cluster occur among 40 draws
    for name in "ABC":
        assert {d.mode for d in specs if d.cluster == name} == set(FEDMP_CLUSTERS[name].modes)
    # A is near and fast, C far and slow: every A uplink beats every C uplink
    up = {name: [d.profile.uplink_bytes_per_second for d in specs if d.cluster == name] for name in "ABC"}
    assert min(up["A"]) > max(up["B"]) and min(up["B"]) > max(up["C"])


def test_default_jitter_keeps_modes_ordered():
    specs = fedmp_device_specs({"A": 50, "B": 50, "C": 50}, seed=2)
    by_mode = {m: [d.profile.flops_per_second for d in specs if d.mode == m] for m in range(4)}
    for m in range(3):
        assert min(by_mode[m]) > max(by_mode[m + 1])
    for m, speeds in by_mode.items():
        base = JETSON_TX2_MODES[m].flops_per_second
        assert all(base * math.exp(-0.02) <= s <= base * math.exp(0.02) for s in speeds)
        assert len(set(speeds)) == len(speeds)  # jitter really varies the boards


def test_devices_are_deterministic_per_seed_and_client():
    a = fedmp_devices("medium", seed=5)
    assert a == fedmp_devices("medium", seed=5)
    assert a != fedmp_devices("medium", seed=6)
    assert all(isinstance(d, DeviceProfile) for d in a)
    # the first clients of a bigger A+B set are drawn exactly as in the smaller one
    big = fedmp_devices({"A": 15, "B": 15}, seed=5)
    assert big[:5] == a[:5]
    assert fedmp_devices({"A": 5, "B": 5}, seed=5) == a


def test_availability_and_failure_are_passed_through():
    devs = fedmp_devices("low", seed=0, availability=0.9, failure_prob=0.1)
    assert all(d.availability == 0.9 and d.failure_prob == 0.1 for d in devs)


@pytest.mark.parametrize(
    ("arg", "kwargs", "message"),
    [
        ("extreme", {}, "unknown FedMP scenario 'extreme'; valid: low, medium, high"),
        ({"A": 2, "D": 1}, {}, r"unknown FedMP cluster\(s\) \['D'\]; valid: A, B, C"),
        ({"A": -1}, {}, "count of cluster 'A' must be an int >= 0, got -1"),
        ({"A": 0}, {}, "needs at least one device"),
        (3, {}, "must be a scenario name or a mapping"),
        ("low", {"jitter": 1.5}, r"`jitter` must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_arguments_are_named(arg, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        fedmp_devices(arg, **kwargs)


def test_bandwidth_fluctuation_is_seeded_and_opt_in():
    devs = fedmp_devices("high", seed=0)
    assert fluctuate_bandwidth(devs, 3, seed=0, sigma=0.0) == devs
    r3 = fluctuate_bandwidth(devs, 3, seed=0, sigma=0.3)
    assert r3 == fluctuate_bandwidth(devs, 3, seed=0, sigma=0.3)
    assert r3 != fluctuate_bandwidth(devs, 4, seed=0, sigma=0.3)
    for base, moved in zip(devs, r3):
        f_up = moved.uplink_bytes_per_second / base.uplink_bytes_per_second
        f_down = moved.downlink_bytes_per_second / base.downlink_bytes_per_second
        assert f_up == pytest.approx(f_down)
        assert math.exp(-0.6) <= f_up <= math.exp(0.6) and f_up != 1.0
        assert moved.flops_per_second == base.flops_per_second
    with pytest.raises(ConfigError, match="`sigma` must be a finite number >= 0, got -0.1"):
        fluctuate_bandwidth(devs, 0, seed=0, sigma=-0.1)
