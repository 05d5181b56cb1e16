"""A FedML deployment on one machine against the simulator, same workload and seeds.

Measures, for ``recipes/fedml/digits_grpc.yaml`` (FedMP with fixed ratios on digits, 3 clients):

* per-round wall time of the deployment (server + client processes over GRPC on 127.0.0.1, or
  MQTT_S3 through a local mosquitto and moto) and of the simulator, and their ratio;
* bytes on the wire (what the transport carried: envelope + GRPC request / MQTT message and S3
  object) against payload bytes (the encoded tasks and results the simulator charges);
* idle CPU of a client process waiting for its server and of a server waiting for its clients;
* that both end with the same final model.

    python benchmarks/fedml_vs_simulation.py                  # GRPC, 10 rounds
    python benchmarks/fedml_vs_simulation.py --backend MQTT_S3 --rounds 5

Needs ``pip install 'lightning_fedprune[fedml]'`` (and mosquitto + moto for MQTT_S3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"GRPC": ROOT / "recipes" / "fedml" / "digits_grpc.yaml", "MQTT_S3": ROOT / "recipes" / "fedml" / "digits_mqtt_s3.yaml"}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle(pid: int, seconds: float) -> float:
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def _wait_for(log: Path, needle: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and needle in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"{log.name}: the process exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"{log.name}: no {needle!r} after {timeout_s} s")


def _per_round(records: list[dict], key: str = "wall_time") -> list[float]:
    cum = [float(r[key]) for r in records]
    return [b - a for a, b in zip([0.0, *cum[:-1]], cum)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(CONFIGS), default="GRPC")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--run-dir", default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from lightning_fedprune.core.serialization import load_state
    from lightning_fedprune.fedml_adapters.services import LocalBroker, LocalObjectStore, free_port
    from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, GrpcAddress, write_grpc_ipconfig
    from lightning_fedprune.reporting import format_bytes, read_metrics
    from lightning_fedprune.simulation import build_run

    torch.set_num_threads(1)
    console = Console()
    base = Path(args.run_dir or tempfile.mkdtemp(prefix="lfp-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    overrides = [f"rounds={args.rounds}", f"run_dir={base / 'deployment'}"]

    with contextlib.ExitStack() as stack:
        if args.backend == "GRPC":
            ipc = write_grpc_ipconfig(base / "grpc_ipconfig.csv", {r: GrpcAddress(r, "127.0.0.1", free_port(), "127.0.0.1") for r in range(4)})
            overrides.append(f"comm_args.grpc_ipconfig_path={ipc}")
            cfg = DeploymentConfig.from_yaml(CONFIGS[args.backend], overrides=overrides)
        else:
            broker = stack.enter_context(LocalBroker(workdir=base / "mosquitto"))
            store = stack.enter_context(LocalObjectStore(workdir=base / "moto"))
            cfg = DeploymentConfig.from_yaml(CONFIGS[args.backend], overrides=overrides)
            cfg = cfg.replace(comm_args=type(cfg.comm_args)(**{
                **cfg.comm_args.__dict__,
                "customized_training_mqtt_config": broker.fedml_config(),
                "customized_training_s3_config": store.fedml_config(),
            }))
        config = base / "deployment.yaml"
        config.write_text(cfg.to_yaml())

        # ---------------------------------------------------------------- the deployment
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        logs = base / "logs"
        logs.mkdir(exist_ok=True)
        procs: dict[str, subprocess.Popen] = {}

        def start(name: str, *cli: str) -> Path:
            log = logs / f"{name}.log"
            procs[name] = subprocess.Popen([sys.executable, "-m", "lightning_fedprune", *cli], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
            return log

        try:
            console.print(f"starting a {args.backend} deployment (1 server + {cfg.worker_num} clients) in {base}")
            log1 = start("client_1", "client", str(config), "--rank", "1")
            _wait_for(log1, "saying hello", procs["client_1"])
            idle_client = _idle(procs["client_1"].pid, args.idle_seconds)
            logs_srv = start("server", "server", str(config), "--no-progress")
            _wait_for(logs_srv, "rank 1 is up", procs["server"])
            idle_server = _idle(procs["server"].pid, args.idle_seconds)
            for r in range(2, cfg.worker_num + 1):
                start(f"client_{r}", "client", str(config), "--rank", str(r))
            t0 = time.monotonic()
            if procs["server"].wait(timeout=1800) != 0:
                raise SystemExit(f"the server failed:\n{logs_srv.read_text()[-3000:]}")
            deployment_total = time.monotonic() - t0
            for p in procs.values():
                p.wait(timeout=60)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()

    dep = read_metrics(cfg.run_dir)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())

    # ---------------------------------------------------------------- the simulator
    engine, rounds = build_run(cfg.recipe.apply_overrides([f"run_dir={base / 'simulation'}"]), listeners=[])
    engine.run(rounds)
    sim = engine.history

    dep_round = _per_round(dep)
    sim_round = _per_round(sim)
    dep_transport = [float(r["round_sim_time"]) for r in dep]
    payload = sum(r["bytes_up"] + r["bytes_down"] for r in dep)
    wire = sum(r["wire_bytes_up"] + r["wire_bytes_down"] for r in dep)
    final = load_state(cfg.run_dir / "global_model.safetensors")
    diff = max(float((final[k] - v).abs().max()) for k, v in engine.strategy.global_state.items())

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    table = Table(title=f"FedML {args.backend} deployment vs simulator: {args.rounds} rounds, {cfg.num_clients} clients, FedMP on digits")
    table.add_column("measure")
    table.add_column("deployment", justify="right")
    table.add_column("simulator", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row(
        "wall time per round (mean)", f"{mean(dep_round) * 1e3:.1f} ms", f"{mean(sim_round) * 1e3:.1f} ms",
        f"{mean(dep_round) / mean(sim_round):.2f}x",
    )
    table.add_row("  of which tasks out -> results in", f"{mean(dep_transport) * 1e3:.1f} ms", "-", "-")
    table.add_row(
        "wall time per round (median)", f"{sorted(dep_round)[len(dep_round) // 2] * 1e3:.1f} ms",
        f"{sorted(sim_round)[len(sim_round) // 2] * 1e3:.1f} ms", "",
    )
    table.add_row("payload bytes (tasks + results)", format_bytes(payload), format_bytes(sum(r['bytes_up'] + r['bytes_down'] for r in sim)), "")
    table.add_row("bytes on the wire", format_bytes(wire), "-", f"{wire / payload:.4f}x payload")
    table.add_row("idle CPU: client waiting for its server", f"{100 * idle_client:.2f}% of a core", "-", "")
    table.add_row("idle CPU: server waiting for clients", f"{100 * idle_server:.2f}% of a core", "-", "")
    table.add_row("final accuracy", f"{dep[-1]['test_accuracy']:.4f}", f"{sim[-1]['test_accuracy']:.4f}", "")
    table.add_row("largest final-model difference", f"{diff:.3g}", "", "")
    table.add_row("start of the last clients -> server exit (with imports)", f"{deployment_total:.2f} s", "", "")
    console.print(table)
    console.print(f"transport counters: {summary.get('transport')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
