"""Pruning plans: the public entry point (implemented in :mod:`lightning_fedprune.core.pruning`).

>>> from lightning_fedprune.core.plans import Planner, Plan, resize_module
>>> planner = Planner.from_module(model, example_input, unprunable=("classifier",))
>>> plan = planner.plan(global_state, 0.5)
>>> sub = create_model(name); resize_module(sub, plan.sub_shapes()); sub.load_state_dict(plan.extract(global_state))
"""

from lightning_fedprune.core.pruning import Layout, Plan, Planner, matches_unprunable, resize_module

__all__ = ["Planner", "Plan", "Layout", "resize_module", "matches_unprunable"]
