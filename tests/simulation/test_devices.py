"""Seeded simulated devices and the round-time cost model."""

from __future__ import annotations

import pytest

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.simulation import DeviceProfile, make_devices, round_time


def test_round_time_by_hand():
    # 2e9 FLOPs at 1e9 FLOP/s = 2 s; 4000 bytes down at 2000 B/s = 2 s; 500 bytes up at 1000 B/s = 0.5 s
    dev = DeviceProfile(flops_per_second=1e9, uplink_bytes_per_second=1000.0, downlink_bytes_per_second=2000.0)
    assert round_time(dev, flops=2e9, bytes_down=4000, bytes_up=500) == pytest.approx(4.5)
    assert dev.transfer_seconds(4000, 500) == (2.0, 0.5)
    assert dev.compute_seconds(3e9) == 3.0


def test_make_devices_is_seeded_and_within_ranges():
    a = make_devices(50, seed=3, compute_gflops=(1.0, 10.0), uplink_mbps=(1.0, 10.0), downlink_mbps=8.0)
    assert a == make_devices(50, seed=3, compute_gflops=(1.0, 10.0), uplink_mbps=(1.0, 10.0), downlink_mbps=8.0)
    assert a != make_devices(50, seed=4, compute_gflops=(1.0, 10.0), uplink_mbps=(1.0, 10.0), downlink_mbps=8.0)
    assert all(1e9 <= d.flops_per_second <= 1e10 for d in a)
    assert all(1e6 / 8 <= d.uplink_bytes_per_second <= 1e7 / 8 for d in a)
    assert all(d.downlink_bytes_per_second == pytest.approx(1e6) for d in a)  # 8 Mbit/s = 1 MB/s
    assert len({d.flops_per_second for d in a}) == 50


def test_make_devices_availability_and_failure():
    devs = make_devices(3, availability=0.5, failure_prob=0.25)
    assert all(d.availability == 0.5 and d.failure_prob == 0.25 for d in devs)
    assert devs[0].to_json()["failure_prob"] == 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flops_per_second": 0.0}, "DeviceProfile.flops_per_second must be a positive finite number, got 0.0"),
        ({"uplink_bytes_per_second": float("inf")}, "uplink_bytes_per_second must be a positive finite number"),
        ({"availability": 1.5}, r"availability must be in \[0, 1\], got 1.5"),
        ({"failure_prob": -0.1}, r"failure_prob must be in \[0, 1\], got -0.1"),
    ],
)
def test_device_profile_is_checked(kwargs, message):
    base = {"flops_per_second": 1.0, "uplink_bytes_per_second": 1.0, "downlink_bytes_per_second": 1.0}
    with pytest.raises(ConfigError, match=message):
        DeviceProfile(**{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "`num_clients` must be >= 1, got 0"),
        ({"compute_gflops": (5.0, 1.0)}, "`compute_gflops` must satisfy 0 < lo <= hi"),
        ({"uplink_mbps": (1.0, 2.0, 3.0)}, r"`uplink_mbps` must be a number or \[lo, hi\]"),
        ({"downlink_mbps": 0.0}, "`downlink_mbps` must satisfy 0 < lo <= hi"),
    ],
)
def test_make_devices_arguments_are_checked(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_devices(**{"num_clients": 2, **kwargs})
