"""Seeded device profiles and the cost model of the simulated clock (plain data, pure functions).

Conventions (written once, used everywhere):
    * compute speed in FLOP/s (``flops_per_second``), bandwidths in bytes/s;
    * a client's round time = download time + compute time + upload time where
      download = task bytes / downlink, compute = FLOPs trained / speed, upload = result bytes / uplink;
    * ``availability``: probability the device can be selected in a round;
    * ``failure_prob``: probability a selected device drops out before delivering its result.

Two families of devices: :func:`make_devices` draws generic heterogeneous devices from ranges;
:func:`fedmp_devices` rebuilds FedMP's Jetson TX2 testbed (computing modes of Table II, clusters
A/B/C of Fig. 3, the Low/Medium/High scenarios of Section V-E).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from lightning_fedprune.core.seeding import rng_for
from lightning_fedprune.errors import ConfigError

__all__ = [
    "DeviceProfile",
    "make_devices",
    "round_time",
    "JetsonMode",
    "JETSON_TX2_MODES",
    "Location",
    "LOCATIONS",
    "FedMPCluster",
    "FEDMP_CLUSTERS",
    "FEDMP_SCENARIOS",
    "FedMPDevice",
    "fedmp_device_specs",
    "fedmp_devices",
    "fluctuate_bandwidth",
    "with_memory",
]


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated device (``memory_bytes``: memory for training, ``None``: not limited)."""

    flops_per_second: float
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    availability: float = 1.0
    failure_prob: float = 0.0
    memory_bytes: float | None = None

    def __post_init__(self) -> None:
        for name in ("flops_per_second", "uplink_bytes_per_second", "downlink_bytes_per_second"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"DeviceProfile.{name} must be a positive finite number, got {v}")
        if not 0.0 <= self.availability <= 1.0:
            raise ConfigError(f"DeviceProfile.availability must be in [0, 1], got {self.availability}")
        if not 0.0 <= self.failure_prob <= 1.0:
            raise ConfigError(f"DeviceProfile.failure_prob must be in [0, 1], got {self.failure_prob}")
        if self.memory_bytes is not None and not (math.isfinite(self.memory_bytes) and self.memory_bytes > 0):
            raise ConfigError(f"DeviceProfile.memory_bytes must be null or a positive number, got {self.memory_bytes}")

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


# ============================================================================= FedMP's testbed
#
# FedMP (Section V-A) runs on NVIDIA Jetson TX2 boards set to four computing modes (Table II) and
# placed at different distances from the access point; Fig. 3 groups them into clusters A, B, C by
# computing mode (x axis) and location (y axis). The figure itself is not in the text; the text
# says "the devices in cluster A work at mode 0 or mode 1" and that modes 0 -> 3 decrease in
# capability. Our reading, used below:
#
#   cluster | modes | location | uplink (Mbit/s) | downlink (Mbit/s)
#   A       | 0, 1  | near     | 40 - 80         | 60 - 120
#   B       | 1, 2  | middle   | 15 - 30         | 22.5 - 45
#   C       | 2, 3  | far      | 4 - 10          | 6 - 15
#
# Bandwidths: a TX2 has a 2x2 802.11ac radio; with ten boards sharing one access point the
# application-level TCP throughput per board is a few tens of Mbit/s close to the access point and
# drops to a few Mbit/s at the edge of coverage (rate adaptation under a weaker signal). The
# downlink is 1.5x the uplink (the access point transmits with more power and better antennas
# than the board). Each device draws its bandwidths log-uniformly inside its location's range.

#: Effective fraction of the Pascal GPU's peak FP32 rate that PyTorch training of the paper's
#: models reaches on a TX2 (small kernels, batch sizes of tens, memory-bound layers).
GPU_EFFECTIVE_UTILIZATION = 0.10
#: CUDA cores of the TX2's Pascal GPU, and FP32 FLOP per core per cycle (one fused multiply-add).
TX2_GPU_CORES = 256
GPU_FLOP_PER_CORE_CYCLE = 2
#: Host-side work (Python, data loading, kernel launches) runs mostly on one thread: per cycle of
#: the fastest active CPU core, the host keeps this many FLOP of GPU work fed.
HOST_FLOP_PER_CPU_CYCLE = 200.0


@dataclass(frozen=True)
class JetsonMode:
    """One computing mode of a Jetson TX2 (a row of FedMP's Table II).

    Attributes:
        mode: the mode's number (0 = most capable).
        denver_cores / denver_ghz: active NVIDIA Denver2 cores and their clock (0 / 0.0 = off).
        a57_cores / a57_ghz: active ARM Cortex-A57 cores and their clock.
        gpu_ghz: the Pascal GPU's clock.

    The effective training throughput (:attr:`flops_per_second`) is a serial model: every FLOP
    costs GPU time plus host time,

        1 / throughput = 1 / (GPU_EFFECTIVE_UTILIZATION * TX2_GPU_CORES * GPU_FLOP_PER_CORE_CYCLE * gpu_hz)
                       + 1 / (HOST_FLOP_PER_CPU_CYCLE * fastest_cpu_hz)

    so the GPU clock dominates and the CPU clocks separate modes 1 and 2 (same GPU clock, 2.0 vs
    1.4 GHz cores). Modes 0..3 give about 57.1, 50.2, 47.6 and 36.8 GFLOP/s.
    """

    mode: int
    denver_cores: int
    denver_ghz: float
    a57_cores: int
    a57_ghz: float
    gpu_ghz: float

    @property
    def gpu_flops_per_second(self) -> float:
        """Effective GPU FLOP/s (peak FP32 x utilization)."""
        return GPU_EFFECTIVE_UTILIZATION * TX2_GPU_CORES * GPU_FLOP_PER_CORE_CYCLE * self.gpu_ghz * 1e9

    @property
    def host_flops_per_second(self) -> float:
        """FLOP/s of GPU work the host thread can keep fed (fastest active core)."""
        fastest = max(self.denver_ghz if self.denver_cores else 0.0, self.a57_ghz if self.a57_cores else 0.0)
        return HOST_FLOP_PER_CPU_CYCLE * fastest * 1e9

    @property
    def flops_per_second(self) -> float:
        """Effective training throughput (see the class docstring)."""
        return 1.0 / (1.0 / self.gpu_flops_per_second + 1.0 / self.host_flops_per_second)


#: Table II of FedMP: the four computing modes of the Jetson TX2 workers (capability 0 > 1 > 2 > 3).
JETSON_TX2_MODES: tuple[JetsonMode, ...] = (
    JetsonMode(0, denver_cores=2, denver_ghz=2.0, a57_cores=4, a57_ghz=2.0, gpu_ghz=1.30),
    JetsonMode(1, denver_cores=0, denver_ghz=0.0, a57_cores=4, a57_ghz=2.0, gpu_ghz=1.12),
    JetsonMode(2, denver_cores=2, denver_ghz=1.4, a57_cores=4, a57_ghz=1.4, gpu_ghz=1.12),
    JetsonMode(3, denver_cores=0, denver_ghz=0.0, a57_cores=4, a57_ghz=1.2, gpu_ghz=0.85),
)


@dataclass(frozen=True)
class Location:
    """A placement relative to the access point: log-uniform bandwidth ranges in Mbit/s."""

    name: str
    uplink_mbps: tuple[float, float]
    downlink_mbps: tuple[float, float]


@dataclass(frozen=True)
class FedMPCluster:
    """A cluster of Fig. 3: the computing modes its devices run at and where they are placed."""

    name: str
    modes: tuple[int, ...]
    location: Location


LOCATIONS: dict[str, Location] = {
    "near": Location("near", uplink_mbps=(40.0, 80.0), downlink_mbps=(60.0, 120.0)),
    "middle": Location("middle", uplink_mbps=(15.0, 30.0), downlink_mbps=(22.5, 45.0)),
    "far": Location("far", uplink_mbps=(4.0, 10.0), downlink_mbps=(6.0, 15.0)),
}

#: Fig. 3's clusters (our reading, see the table at the top of this section).
FEDMP_CLUSTERS: dict[str, FedMPCluster] = {
    "A": FedMPCluster("A", modes=(0, 1), location=LOCATIONS["near"]),
    "B": FedMPCluster("B", modes=(1, 2), location=LOCATIONS["middle"]),
    "C": FedMPCluster("C", modes=(2, 3), location=LOCATIONS["far"]),
}

#: Section V-E's heterogeneity levels (10 workers each); "medium" is also the default setting.
FEDMP_SCENARIOS: dict[str, dict[str, int]] = {
    "low": {"A": 10},
    "medium": {"A": 5, "B": 5},
    "high": {"A": 3, "B": 3, "C": 4},
}


@dataclass(frozen=True)
class FedMPDevice:
    """A drawn FedMP worker: where it came from and its simulated profile."""

    client: int
    cluster: str
    mode: int
    location: str
    profile: DeviceProfile


def _cluster_counts(scenario_or_counts: str | Mapping[str, int]) -> list[tuple[str, int]]:
    if isinstance(scenario_or_counts, str):
        key = scenario_or_counts.lower()
        if key not in FEDMP_SCENARIOS:
            raise ConfigError(
                f"unknown FedMP scenario {scenario_or_counts!r}; valid: {', '.join(FEDMP_SCENARIOS)} "
                f"(or a mapping of cluster -> count over {', '.join(FEDMP_CLUSTERS)})"
            )
        counts: Mapping[str, int] = FEDMP_SCENARIOS[key]
    elif isinstance(scenario_or_counts, Mapping):
        counts = scenario_or_counts
    else:
        raise ConfigError(f"`scenario_or_counts` must be a scenario name or a mapping, got {type(scenario_or_counts).__name__}")
    unknown = [c for c in counts if c not in FEDMP_CLUSTERS]
    if unknown:
        raise ConfigError(f"unknown FedMP cluster(s) {unknown}; valid: {', '.join(FEDMP_CLUSTERS)}")
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"count of cluster {name!r} must be an int >= 0, got {n!r}")
    out = [(name, counts[name]) for name in FEDMP_CLUSTERS if counts.get(name, 0) > 0]
    if not out:
        raise ConfigError(f"a FedMP device set needs at least one device, got {dict(counts)}")
    return out


def fedmp_device_specs(
    scenario_or_counts: str | Mapping[str, int],
    *,
    seed: int = 0,
    jitter: float = 0.02,
    availability: float = 1.0,
    failure_prob: float = 0.0,
) -> list[FedMPDevice]:
    """FedMP's heterogeneous workers, with their cluster, computing mode and location.

    Clients are numbered cluster by cluster in the order A, B, C. Client ``i`` of cluster ``X``
    draws (from a generator seeded by ``(seed, "fedmp-device", i, X)``, so its device depends only
    on the seed, its index and its cluster):

    * its computing mode uniformly among the cluster's modes;
    * its compute speed = the mode's throughput x ``exp(u)``, ``u ~ U(-jitter, jitter)`` (board
      to board variation: thermal state, memory clocks);
    * its uplink and downlink log-uniformly in its location's ranges.

    Args:
        scenario_or_counts: ``"low"`` (10 x A), ``"medium"`` (5 A + 5 B, the paper's default),
            ``"high"`` (3 A + 3 B + 4 C), or a mapping such as ``{"A": 15, "B": 15}``.
        seed: the run seed.
        jitter: half-width of the log-uniform compute variation (0 = every board of a mode equal).
            With the default 0.02 a board never outruns a board of a more capable mode (modes 1
            and 2 are 5 % apart).
        availability / failure_prob: copied into every :class:`DeviceProfile`.

    Raises:
        ConfigError: an unknown scenario or cluster (the message lists the valid ones), a bad
            count or jitter.
    """
    counts = _cluster_counts(scenario_or_counts)
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not (math.isfinite(jitter) and 0.0 <= jitter < 1.0):
        raise ConfigError(f"`jitter` must be in [0, 1), got {jitter!r}")
    devices: list[FedMPDevice] = []
    for cluster_name, n in counts:
        cluster = FEDMP_CLUSTERS[cluster_name]
        loc = cluster.location
        for _ in range(n):
            index = len(devices)
            rng = rng_for(seed, "fedmp-device", index, cluster_name)
            mode = JETSON_TX2_MODES[cluster.modes[int(rng.integers(len(cluster.modes)))]]
            speed = mode.flops_per_second * math.exp(float(rng.uniform(-jitter, jitter))) if jitter > 0 else mode.flops_per_second
            up = float(_draw(rng, loc.uplink_mbps, 1, "uplink_mbps")[0]) * 1e6 / 8
            down = float(_draw(rng, loc.downlink_mbps, 1, "downlink_mbps")[0]) * 1e6 / 8
            profile = DeviceProfile(speed, up, down, availability=float(availability), failure_prob=float(failure_prob))
            devices.append(FedMPDevice(index, cluster_name, mode.mode, loc.name, profile))
    return devices


def fedmp_devices(
    scenario_or_counts: str | Mapping[str, int],
    *,
    seed: int = 0,
    jitter: float = 0.02,
    availability: float = 1.0,
    failure_prob: float = 0.0,
) -> list[DeviceProfile]:
    """The :class:`DeviceProfile` s of :func:`fedmp_device_specs` (same arguments), one per client."""
    specs = fedmp_device_specs(scenario_or_counts, seed=seed, jitter=jitter, availability=availability, failure_prob=failure_prob)
    return [d.profile for d in specs]


def fluctuate_bandwidth(devices: Sequence[DeviceProfile], rnd: int, *, seed: int, sigma: float = 0.2) -> list[DeviceProfile]:
    """Opt-in per-round bandwidth fluctuation (devices move, links fade).

    Client ``i``'s uplink and downlink in round ``rnd`` are its base values times
    ``exp(clip(z, -2, 2) * sigma)`` with ``z ~ N(0, 1)`` drawn from ``(seed, "bandwidth", rnd, i)``
    (one factor for both directions). Compute speed, availability and failure probability are
    unchanged; ``sigma = 0`` returns the devices as they are.

    Raises:
        ConfigError: ``sigma`` negative or not finite, or ``rnd`` negative.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"`sigma` must be a finite number >= 0, got {sigma!r}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ConfigError(f"`rnd` must be an int >= 0, got {rnd!r}")
    if sigma == 0:
        return list(devices)
    out = []
    for i, dev in enumerate(devices):
        z = float(np.clip(rng_for(seed, "bandwidth", rnd, i).standard_normal(), -2.0, 2.0))
        factor = math.exp(z * sigma)
        out.append(replace(dev, uplink_bytes_per_second=dev.uplink_bytes_per_second * factor, downlink_bytes_per_second=dev.downlink_bytes_per_second * factor))
    return out


def with_memory(devices: Sequence[DeviceProfile], memory_mb: float | Sequence[float], *, seed: int) -> list[DeviceProfile]:
    """The devices with training memory: a number of MiB for all, or ``[lo, hi]`` drawn
    log-uniformly per device from ``(seed, "memory")``.

    Raises:
        ConfigError: a span that is not positive and ordered.
    """
    mib = _draw(rng_for(seed, "memory"), memory_mb, len(devices), "memory_mb")
    return [replace(d, memory_bytes=float(m) * 2**20) for d, m in zip(devices, mib)]
