"""What server and client processes build from a deployment config; edge devices' own data folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from fedml_testing import RECIPES, ROOT

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.components import (
    DATA_META_FILE,
    LocalClientData,
    build_client_runtime,
    build_server_parts,
    export_client_data,
)
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig
from lightning_fedprune.simulation import build_run

torch.set_num_threads(1)


def _cfg(*extra: str) -> DeploymentConfig:
    return DeploymentConfig.from_yaml(RECIPES / "digits_grpc.yaml", overrides=["rounds=1", "run_dir=null", *extra])


def test_server_starts_from_the_simulators_initial_state():
    cfg = _cfg()
    parts = build_server_parts(cfg)
    engine, _ = build_run(cfg.recipe, listeners=[])
    for k, v in engine.strategy.global_state.items():
        assert torch.equal(parts.strategy.global_state[k], v)
    assert parts.num_clients == 3 and parts.evaluator.available
    assert parts.strategy.planner is not None  # FedMP plans sub-models on the server
    # a server builds no runtime and, for a strategy not told about devices, no simulated devices
    assert parts.runtime is None and parts.devices is None


def test_a_client_builds_its_runtime_only():
    from lightning_fedprune.config import build_parts

    parts = build_parts(_cfg().recipe, role="client")
    assert parts.runtime is not None and parts.strategy is None and parts.devices is None and parts.evaluator is None
    assert [type(c).__name__ for c in parts.runtime.callbacks] == []  # FedMP needs no client callback


def test_a_client_with_only_its_exported_data_trains_exactly_like_one_with_the_dataset(tmp_path):
    # Prepare: rank 2 of 2 processes serves clients 1 and 3 of 4 (with local test splits)
    extra = ["data.num_clients=4", "device_args.worker_num=2", "data.local_test_fraction=0.2", "strategy.options={fixed_ratios: {1: 0.5}}"]
    cfg = _cfg(*extra)
    folder = export_client_data(cfg, 2, tmp_path / "own")
    meta = json.loads((folder / DATA_META_FILE).read_text())
    assert meta["clients"] == [1, 3]
    assert sorted(p.name for p in folder.glob("client_*.safetensors")) == ["client_1.safetensors", "client_3.safetensors"]
    full = build_client_runtime(cfg, 2)
    own = build_client_runtime(_cfg(*extra, f"data_args.data_cache_dir={folder}"), 2)
    assert isinstance(own.data, LocalClientData) and own.data.client_ids == [1, 3]
    for c in (1, 3):
        assert own.data.num_train_samples(c) == full.data.num_train_samples(c)
    # Execute: the same round-0 tasks on both
    engine, _ = build_run(cfg.recipe, listeners=[])
    tasks = [t for t in engine.strategy.configure_round(0, [0, 1, 2, 3]) if t.client_id in (1, 3)]
    assert tasks[0].weights["model.features.0.weight"].shape[0] == 150  # client 1 got a half-size sub-model
    a = full.run_many(tasks, ClientStore())
    b = own.run_many(tasks, ClientStore())
    # Assert: bit-identical results, local test metrics included
    for ra, rb in zip(a, b):
        assert ra.metrics.num_samples == rb.metrics.num_samples and ra.metrics.loss_after == rb.metrics.loss_after
        assert ra.metrics.extra["local_test_acc"] == rb.metrics.extra["local_test_acc"]
        for k in ra.weights:
            assert torch.equal(ra.weights[k], rb.weights[k]), k


def test_exported_data_must_match_the_rank_and_the_data_set_up(tmp_path):
    cfg = _cfg()
    folder = export_client_data(cfg, 1, tmp_path / "own")
    with pytest.raises(ConfigError, match=r"holds clients \[0\], but rank 2 serves \[1\]"):
        build_client_runtime(_cfg(f"data_args.data_cache_dir={folder}"), 2)
    with pytest.raises(ConfigError, match="exported for another data set-up.*partition"):
        build_client_runtime(_cfg(f"data_args.data_cache_dir={folder}", "data.partition=dirichlet"), 1)
    with pytest.raises(ConfigError, match="holds no client_data.json.*export-data"):
        LocalClientData.load(tmp_path)


def test_importing_the_library_and_its_cli_does_not_import_fedml():
    code = (
        "import sys, lightning_fedprune, lightning_fedprune.cli, lightning_fedprune.fedml_adapters\n"
        "from lightning_fedprune.fedml_adapters import settings, envelope, rounds, server, client, launch, services\n"
        "assert lightning_fedprune.cli.main(['show', 'recipes/digits_fedavg.yaml']) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'fedml' or m.startswith('fedml.'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
