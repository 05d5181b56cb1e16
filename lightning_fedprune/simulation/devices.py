"""Simulated devices and the simulated clock's cost model (defined in :mod:`lightning_fedprune.core.devices`).

They are plain data and pure functions, so the recipe builder and strategies that use declared
device profiles (NestFL's resources, FedProx's capability-scaled work) need not import the
simulation.
"""

from lightning_fedprune.core.devices import *  # noqa: F401,F403
from lightning_fedprune.core.devices import __all__  # noqa: F401
