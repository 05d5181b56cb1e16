"""A FedML deployment on one machine, checked against the simulator.

Starts a server and three client processes (and, for MQTT_S3, a local mosquitto broker and a local
moto S3 store) with ``python -m lightning_fedprune launch``, runs FedMP with fixed per-client
pruning ratios (three sub-models of different sizes) on scikit-learn's digits, then runs the same
recipe in the simulator and compares the final global models::

    python examples/fedml_one_machine.py                       # GRPC on 127.0.0.1
    python examples/fedml_one_machine.py --backend MQTT_S3     # MQTT + S3, cross-device style
    python examples/fedml_one_machine.py --rounds 10 --run-dir runs/demo

Needs ``pip install 'lightning_fedprune[fedml]'`` (and ``apt-get install mosquitto`` for MQTT_S3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"GRPC": ROOT / "recipes" / "fedml" / "digits_grpc.yaml", "MQTT_S3": ROOT / "recipes" / "fedml" / "digits_mqtt_s3.yaml"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(CONFIGS), default="GRPC")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3, help="client processes (1..3)")
    parser.add_argument("--run-dir", default="runs/fedml_one_machine")
    args = parser.parse_args(argv)

    from lightning_fedprune.cli import main as cli
    from lightning_fedprune.core.serialization import load_state
    from lightning_fedprune.fedml_adapters.settings import DeploymentConfig
    from lightning_fedprune.simulation import build_run

    overrides = [f"rounds={args.rounds}", f"run_dir={args.run_dir}"]
    # 1. the deployment: one progress view, then the summary table
    code = cli(["launch", str(CONFIGS[args.backend]), "--clients", str(args.clients), *sum((["--set", o] for o in overrides), [])])
    if code != 0:
        return code

    # 2. the same recipe in the simulator (same seeds, same ratios)
    torch.set_num_threads(1)
    cfg = DeploymentConfig.from_yaml(CONFIGS[args.backend], overrides=overrides)
    engine, rounds = build_run(cfg.recipe.apply_overrides([f"run_dir={Path(args.run_dir) / 'simulation'}"]), listeners=[])
    engine.run(rounds)
    deployed = load_state(Path(args.run_dir) / "global_model.safetensors")
    diff = max(float((deployed[k] - v).abs().max()) for k, v in engine.strategy.global_state.items())
    print(f"deployment vs simulator: largest difference of the final global models {diff:.3g}")
    print(f"simulator final accuracy {engine.history[-1]['test_accuracy']:.4f}")
    return 0 if diff <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
