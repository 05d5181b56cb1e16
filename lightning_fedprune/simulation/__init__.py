"""The in-process simulation transport: engine, simulated devices and clock."""

from lightning_fedprune.simulation.devices import DeviceProfile, make_devices, round_time
from lightning_fedprune.simulation.engine import CHECKPOINT_NAME, SimulationEngine

__all__ = ["SimulationEngine", "DeviceProfile", "make_devices", "round_time", "CHECKPOINT_NAME"]
