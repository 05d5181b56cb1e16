"""Seeded simulated devices and the cost model of the simulated clock.

Conventions (written once, used everywhere):
    * compute speed in FLOP/s (``flops_per_second``), bandwidths in bytes/s;
    * a client's round time = download time + compute time + upload time where
      download = task bytes / downlink, compute = FLOPs trained / speed, upload = result bytes / uplink;
    * ``availability``: probability the device can be selected in a round;
    * ``failure_prob``: probability a selected device drops out before delivering its result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError

__all__ = ["DeviceProfile", "make_devices", "round_time"]


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device."""

    flops_per_second: float
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    availability: float = 1.0
    failure_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flops_per_second", "uplink_bytes_per_second", "downlink_bytes_per_second"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"DeviceProfile.{name} must be a positive finite number, got {v}")
        if not 0.0 <= self.availability <= 1.0:
            raise ConfigError(f"DeviceProfile.availability must be in [0, 1], got {self.availability}")
        if not 0.0 <= self.failure_prob <= 1.0:
            raise ConfigError(f"DeviceProfile.failure_prob must be in [0, 1], got {self.failure_prob}")

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    def compute_seconds(self, flops: float) -> float:
        return float(flops) / self.flops_per_second

    def transfer_seconds(self, bytes_down: int, bytes_up: int) -> tuple[float, float]:
        return bytes_down / self.downlink_bytes_per_second, bytes_up / self.uplink_bytes_per_second


def round_time(device: DeviceProfile, *, flops: float, bytes_down: int, bytes_up: int) -> float:
    """Simulated seconds one client needs for one round (download + compute + upload)."""
    down, up = device.transfer_seconds(bytes_down, bytes_up)
    return down + device.compute_seconds(flops) + up


def _draw(rng: np.random.Generator, span: float | Sequence[float], n: int, name: str) -> np.ndarray:
    """Log-uniform draws in ``[lo, hi]`` (a single number gives a constant)."""
    if isinstance(span, (int, float)):
        lo = hi = float(span)
    else:
        if len(span) != 2:
            raise ConfigError(f"`{name}` must be a number or [lo, hi], got {span!r}")
        lo, hi = float(span[0]), float(span[1])
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ConfigError(f"`{name}` must satisfy 0 < lo <= hi, got {span!r}")
    if lo == hi:
        return np.full(n, lo)
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))


def make_devices(
    num_clients: int,
    *,
    seed: int = 0,
    compute_gflops: float | Sequence[float] = (1.0, 10.0),
    uplink_mbps: float | Sequence[float] = (1.0, 10.0),
    downlink_mbps: float | Sequence[float] = (5.0, 50.0),
    availability: float = 1.0,
    failure_prob: float = 0.0,
) -> list[DeviceProfile]:
    """Seeded heterogeneous devices: speeds and bandwidths drawn log-uniformly in the given ranges.

    Args:
        num_clients: how many devices.
        seed: the draws depend only on it.
        compute_gflops: GFLOP/s, a constant or ``[lo, hi]``.
        uplink_mbps / downlink_mbps: megabit/s (10**6 bits), a constant or ``[lo, hi]``.
        availability: probability of being selectable each round.
        failure_prob: probability of dropping out after selection.
    """
    if num_clients < 1:
        raise ConfigError(f"`num_clients` must be >= 1, got {num_clients}")
    rng = rng_for(seed, "devices")
    comp = _draw(rng, compute_gflops, num_clients, "compute_gflops") * 1e9
    up = _draw(rng, uplink_mbps, num_clients, "uplink_mbps") * 1e6 / 8
    down = _draw(rng, downlink_mbps, num_clients, "downlink_mbps") * 1e6 / 8
    return [
        DeviceProfile(float(c), float(u), float(d), availability=float(availability), failure_prob=float(failure_prob))
        for c, u, d in zip(comp, up, down)
    ]
