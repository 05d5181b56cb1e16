"""NestFL deployed over GRPC: 1 server + 3 client processes end where the simulator ends, and each
client process keeps its personalized sub-network in its own state folder."""

from __future__ import annotations

import torch
from fedml_testing import assert_simulators_model, grpc_deployment, need_fedml, read_jsonl, run_deployment

from lightning_fedprune.callbacks.personal import personal_model
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.fedml_adapters.client import client_dir

torch.set_num_threads(1)

ROUNDS = 3

def test_nestfl_over_grpc_with_three_client_processes_ends_like_the_simulator(tmp_path):
    need_fedml()
    cfg, config, _ = grpc_deployment(
        tmp_path, f"rounds={ROUNDS}", "strategy.name=nestfl", "strategy.local_steps=3",
        "strategy.options={fixed_rates: {0: 0.0, 1: 0.25, 2: 0.5}}",
    )
    run_deployment(config, tmp_path / "logs")
    engine = assert_simulators_model(cfg)
    records = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for rec, sim in zip(records, engine.history):
        assert rec["num_results"] == 3 and rec["failures"] == []
        assert (rec["bytes_down"], rec["bytes_up"]) == (sim["bytes_down"], sim["bytes_up"])  # the same sub-model payloads
    sizes = {}
    for c in range(3):
        rank = cfg.rank_of_client(c)
        own = personal_model(ClientStore(spill_dir=client_dir(cfg, rank) / "state").get(c))
        sim = personal_model(engine.store.get(c))
        assert own is not None and own["round"] == ROUNDS - 1
        sizes[c] = sum(v.numel() for v in own["weights"].values())
        assert set(own["weights"]) == set(sim["weights"])
        for k, v in sim["weights"].items():
            assert own["weights"][k].shape == v.shape, k  # the sub-network's own (pruned) shapes
            torch.testing.assert_close(own["weights"][k], v, rtol=1e-6, atol=1e-7)
        # the other processes' folders do not hold it
        for other in {1, 2, 3} - {rank}:
            assert personal_model(ClientStore(spill_dir=client_dir(cfg, other) / "state").get(c)) is None
    assert sizes[0] > sizes[1] > sizes[2]  # rates 0, 0.25, 0.5: nested sub-networks of decreasing size
