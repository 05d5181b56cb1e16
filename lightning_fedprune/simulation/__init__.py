"""The in-process simulation transport: engine, simulated devices and clock."""

from lightning_fedprune.core.devices import (
    FEDMP_CLUSTERS,
    FEDMP_SCENARIOS,
    JETSON_TX2_MODES,
    LOCATIONS,
    DeviceProfile,
    FedMPCluster,
    FedMPDevice,
    JetsonMode,
    Location,
    fedmp_device_specs,
    fedmp_devices,
    fluctuate_bandwidth,
    make_devices,
    round_time,
)
from lightning_fedprune.simulation.engine import CHECKPOINT_NAME, MODES, SimulationEngine, SimulationTransport, build_engine, build_run
from lightning_fedprune.simulation.parallel import ParallelClients, cuda_device_count, resolve_devices, resolve_workers

__all__ = [
    "SimulationEngine",
    "SimulationTransport",
    "ParallelClients",
    "resolve_workers",
    "resolve_devices",
    "cuda_device_count",
    "build_engine",
    "build_run",
    "MODES",
    "DeviceProfile",
    "make_devices",
    "round_time",
    "CHECKPOINT_NAME",
    "JETSON_TX2_MODES",
    "JetsonMode",
    "LOCATIONS",
    "Location",
    "FEDMP_CLUSTERS",
    "FedMPCluster",
    "FEDMP_SCENARIOS",
    "FedMPDevice",
    "fedmp_device_specs",
    "fedmp_devices",
    "fluctuate_bandwidth",
]
