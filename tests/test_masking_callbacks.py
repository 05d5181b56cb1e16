"""PruneFL's Lightning callbacks: masked (and sparse) training, iterative pruning, server samples."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedprune.callbacks.masking import IterativeMagnitudePruning, MaskingCallback
from lightning_fedprune.callbacks.server_pruning import run_server_pruning, sample_based_pruning
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.masks import MaskSet, kept_after_levels, magnitude_prune
from lightning_fedprune.core.sparse import COO_INDICES, unpack_with_masks
from lightning_fedprune.core.sparse_linear import is_sparse_forward
from lightning_fedprune.data import make_partition
from lightning_fedprune.data.sampling import biased_sample_indices, sample_loader, shared_sample_indices
from lightning_fedprune.errors import ConfigError, DataError
from lightning_fedprune.runtime import ClientRuntime
from lightning_fedprune.strategies import ModelSpec
from lightning_fedprune.strategies.prunefl import PruneFL

_TRAINER = dict(
    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
)


class Plain(pl.LightningModule):
    """An ordinary LightningModule (no federated mixin): 6 -> 12 -> 3, SGD with momentum and weight decay."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)


def _loader(n: int = 40, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fixed_masks(model: nn.Module, density: float = 0.3) -> MaskSet:
    gen = torch.Generator().manual_seed(1)
    return MaskSet({k: torch.rand(v.shape, generator=gen) < density for k, v in model.state_dict().items() if k.endswith("weight")}, 1)


class _GradProbe(pl.Callback):
    """Records, after the masking callback ran, the gradients the optimizer is about to use."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


# ----------------------------------------------------------------------------- centralized masked training


@pytest.mark.parametrize("sparse", [None, 1.0])
def test_masking_callback_keeps_pruned_weights_at_zero_in_plain_training(sparse):
    # Prepare: momentum and weight decay would revive pruned weights without the callback
    model = Plain()
    masks = _fixed_masks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = _GradProbe()
    cb = MaskingCallback(masks=masks, sparse_fc_max_density=sparse, sparse_fc_min_weights=0)
    # Execute
    pl.Trainer(max_epochs=3, callbacks=[cb, probe], **_TRAINER).fit(model, _loader())
    # Assert
    state = model.state_dict()
    for key, m in masks.masks.items():
        assert bool((state[key][~m] == 0).all()), key
        assert not torch.equal(state[key][m], before[key][m]), key  # the kept ones trained
        for g in probe.grads:
            assert bool((g[key][~m] == 0).all()), key
    assert not is_sparse_forward(model.body)  # switched back after fit


def test_sparse_compute_trains_like_masked_dense():
    runs = {}
    for sparse in (None, 1.0):
        model = Plain()
        cb = MaskingCallback(masks=_fixed_masks(model), sparse_fc_max_density=sparse, sparse_fc_min_weights=0)
        pl.Trainer(max_epochs=2, callbacks=[cb], **_TRAINER).fit(model, _loader())
        runs[sparse] = model.state_dict()
    for k in runs[None]:
        assert torch.allclose(runs[None][k], runs[1.0][k], atol=1e-5), k


def test_masks_that_do_not_fit_the_module_name_the_layer():
    model = Plain()
    bad = MaskSet({"body.weight": torch.ones(12, 7, dtype=torch.bool)}, 1)
    with pytest.raises(ConfigError, match=r"mask of layer 'body.weight' has shape \(12, 7\), the model's weight \(12, 6\)"):
        pl.Trainer(max_epochs=1, callbacks=[MaskingCallback(masks=bad)], **_TRAINER).fit(model, _loader())
    with pytest.raises(ConfigError, match=r"`sparse_fc_max_density` must be null or a number in \[0, 1\]"):
        MaskingCallback(sparse_fc_max_density=2.0)


# ----------------------------------------------------------------------------- federated clients


def _prunefl(module, level: int = 2, **kwargs) -> PruneFL:
    s = PruneFL(initial_pruning="init", initial_level=level, fc_rates=0.5, **kwargs)
    s.initialize(ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names()), num_clients=3)
    return s


@pytest.mark.parametrize("sparse", [None, 1.0])
def test_clients_train_masked_and_upload_packed_results(sparse, tiny_module, tiny_data):
    # Prepare
    module = tiny_module(momentum=0.9)
    strategy = _prunefl(module)
    runtime = ClientRuntime(module, data=tiny_data, seed=2, callbacks=[MaskingCallback(sparse_fc_max_density=sparse, sparse_fc_min_weights=0)])
    tasks = strategy.configure_round(0, [0, 1, 2])
    # Execute
    results = runtime.run_many(tasks, ClientStore())
    # Assert: the upload has exactly the task's packed layout, keeps the server's masks, and trained
    shapes = {k: v.shape for k, v in strategy.global_state.items()}
    for task, res in zip(tasks, results):
        assert {k: (tuple(v.shape), v.dtype) for k, v in res.weights.items()} == strategy.expected_result(task)[0]
        assert any(k.endswith(COO_INDICES) for k in res.weights)
        state, masks = unpack_with_masks(res.weights, shapes)
        for k, m in strategy.masks.masks.items():
            assert torch.equal(masks[k], m), k
            assert not torch.equal(state[k], strategy.global_state[k]), k
        assert res.config["prunefl_sparse_layers"] == (2 if sparse else 0)
        # TinyNet at level 2 (rate 50%): 96 of 128 and 48 of 64 weights pruned -> 2 * 144 forward FLOPs saved
        assert res.config["prunefl_fc_flops_saved_per_example"] == 2.0 * (96 + 48)
    assert not any(is_sparse_forward(m) for m in module.modules())


def test_default_policy_keeps_small_or_dense_layers_dense(tiny_module, tiny_data):
    # TinyNet's layers (128 and 64 weights) are far below the default 50,000-weight minimum
    module = tiny_module()
    strategy = _prunefl(module, level=3)
    res = ClientRuntime(module, data=tiny_data, seed=2, callbacks=[MaskingCallback()]).run(strategy.configure_round(0, [0])[0])
    assert res.config["prunefl_sparse_layers"] == 0
    # with no size minimum, only the layers at or below the density threshold go sparse (both: 12.5%)
    res = ClientRuntime(module, data=tiny_data, seed=2, callbacks=[MaskingCallback(sparse_fc_max_density=0.13, sparse_fc_min_weights=0)]).run(
        strategy.configure_round(0, [0])[0]
    )
    assert res.config["prunefl_sparse_layers"] == 2
    res = ClientRuntime(module, data=tiny_data, seed=2, callbacks=[MaskingCallback(sparse_fc_max_density=0.12, sparse_fc_min_weights=0)]).run(
        strategy.configure_round(0, [0])[0]
    )
    assert res.config["prunefl_sparse_layers"] == 0


def test_sparse_and_dense_clients_agree(tiny_module, tiny_data):
    out = {}
    for sparse in (None, 1.0):
        module = tiny_module(momentum=0.9)
        strategy = _prunefl(module)
        rt = ClientRuntime(module, data=tiny_data, seed=2, callbacks=[MaskingCallback(sparse_fc_max_density=sparse, sparse_fc_min_weights=0)])
        out[sparse] = rt.run_many(strategy.configure_round(0, [0, 1]), ClientStore())
    for a, b in zip(out[None], out[1.0]):
        assert a.weights.keys() == b.weights.keys()
        for k in a.weights:
            if a.weights[k].is_floating_point():
                assert torch.allclose(a.weights[k], b.weights[k], atol=1e-5), k
            else:
                assert torch.equal(a.weights[k], b.weights[k]), k


# ----------------------------------------------------------------------------- iterative pruning (server side)


def test_iterative_pruning_prunes_one_level_every_e_epochs():
    model = Plain()
    cb = IterativeMagnitudePruning(target_level=3, epochs_per_level=2, fc_rates=(0.2, 0.1), snapshot_levels=(1, 3))
    pl.Trainer(max_epochs=6, callbacks=[cb], **_TRAINER).fit(model, _loader())
    assert cb.level == 3 and cb.masks.level == 3
    assert cb.masks.num_kept("body.weight") == kept_after_levels(72, 0.2, 3)[-1]
    assert cb.masks.num_kept("head.weight") == kept_after_levels(36, 0.1, 3)[-1]
    state = model.state_dict()
    for k, m in cb.masks.masks.items():
        assert bool((state[k][~m] == 0).all()), k
    # the last level was taken by magnitude from the weights of the level-2 model after training...
    # ...which the level-3 snapshot equals (no training after the last level)
    masks3, state3 = cb.snapshots[3]
    assert masks3.equal(cb.masks) and torch.equal(state3["body.weight"], state["body.weight"])
    # and the level-1 masks contain the level-3 ones
    masks1, _ = cb.snapshots[1]
    assert not bool((cb.masks.masks["body.weight"] & ~masks1.masks["body.weight"]).any())


def test_iterative_pruning_resumes_from_a_checkpoint(tmp_path):
    # Prepare: an uninterrupted run of 4 epochs, pruning after every epoch
    def cb():
        return IterativeMagnitudePruning(target_level=4, epochs_per_level=1, fc_rates=0.3)

    full_model, full_cb = Plain(), cb()
    pl.Trainer(max_epochs=4, callbacks=[full_cb], **_TRAINER).fit(full_model, _loader())
    # Execute: 2 epochs, checkpoint, then a fresh model, callback and Trainer resume to 4
    half_model, half_cb = Plain(), cb()
    t = pl.Trainer(max_epochs=2, callbacks=[half_cb], **_TRAINER)
    t.fit(half_model, _loader())
    t.save_checkpoint(tmp_path / "half.ckpt")
    assert half_cb.level == 2
    resumed_model, resumed_cb = Plain(seed=9), cb()
    pl.Trainer(max_epochs=4, callbacks=[resumed_cb], **_TRAINER).fit(resumed_model, _loader(), ckpt_path=tmp_path / "half.ckpt")
    # Assert
    assert resumed_cb.level == 4
    assert resumed_cb.masks.equal(full_cb.masks)
    for k, v in full_model.state_dict().items():
        assert torch.allclose(v, resumed_model.state_dict()[k], atol=1e-6), k


def test_iterative_pruning_rejects_bad_settings():
    with pytest.raises(ConfigError, match=r"`epochs_per_level` must be an int >= 1"):
        IterativeMagnitudePruning(target_level=2, epochs_per_level=0)
    with pytest.raises(ConfigError, match=r"layer 'fc_rates\[0\]' must be a number in \[0, 1\), got 1.5"):
        IterativeMagnitudePruning(target_level=2, fc_rates=(1.5, 0.1))
    with pytest.raises(ConfigError, match=r"would remove every weight of layer 'head.weight'"):
        cb = IterativeMagnitudePruning(target_level=9, epochs_per_level=1, fc_rates=(0.1, 0.7))
        pl.Trainer(max_epochs=1, callbacks=[cb], **_TRAINER).fit(Plain(), _loader())
    with pytest.raises(ConfigError, match=r"`fc_rates` has 3 values but the model has 2 fully connected layers"):
        pl.Trainer(max_epochs=1, callbacks=[IterativeMagnitudePruning(target_level=1, epochs_per_level=1)], **_TRAINER).fit(Plain(), _loader())


def test_sample_based_pruning_trains_prunes_in_place_and_returns_the_masks():
    model = Plain()
    masks = sample_based_pruning(model, _loader(), target_level=2, epochs_per_level=1, fc_rates=0.5)
    assert masks.level == 2 and masks.num_kept("body.weight") == kept_after_levels(72, 0.5, 2)[-1]
    assert bool((model.body.weight[~masks.masks["body.weight"]] == 0).all())
    # level 0: nothing trained, nothing pruned
    untouched = Plain()
    before = untouched.body.weight.detach().clone()
    m0 = sample_based_pruning(untouched, _loader(), target_level=0, fc_rates=0.5)
    assert m0.level == 0 and m0.density() == 1.0 and torch.equal(untouched.body.weight, before)
    with pytest.raises(ConfigError, match=r"`trainer_kwargs` may not set \['max_epochs'\]"):
        sample_based_pruning(Plain(), _loader(), target_level=1, trainer_kwargs={"max_epochs": 3})


def test_sample_based_pruning_equals_magnitude_pruning_of_the_trained_weights_at_level_1():
    # one level = train E epochs, then magnitude_prune of exactly those weights
    a, b = Plain(), Plain()
    masks = sample_based_pruning(a, _loader(), target_level=1, epochs_per_level=2, fc_rates=0.4)
    pl.Trainer(max_epochs=2, **_TRAINER).fit(b, _loader())
    expected = magnitude_prune(b.state_dict(), {"body.weight": 0.4, "head.weight": 0.4})
    assert masks.equal(expected)


@pytest.mark.parametrize("labels", [None, (3, 5)])
def test_run_server_pruning_does_what_the_strategy_declares(labels):
    # Prepare: digits (shipped), an MLP, 4 clients; the strategy only declares the sample
    from lightning_fedprune.config import FederatedClassifier
    from lightning_fedprune.data import load_dataset

    splits = load_dataset("digits")
    part = make_partition("iid", splits.train_targets, 4, seed=0)
    torch.manual_seed(0)
    module = FederatedClassifier("mlp", lr=0.1, hidden=(16,))
    untrained = {k: v.clone() for k, v in module.federated_state().items()}
    strategy = PruneFL(initial_pruning="sample", initial_level=2, fc_rates=0.3, sample_size=40, sample_labels=labels,
                       sample_epochs_per_level=1, reinitialize=True)
    # Execute
    masks = run_server_pruning(strategy, module, splits=splits, partition=part, batch_size=10, seed=0)
    strategy.initialize(ModelSpec(state={k: v.clone() for k, v in module.federated_state().items()}, trainable=module.trainable_names()), num_clients=4)
    # Assert: level-2 masks of the trained weights; reinitialize resets to the untrained values
    assert masks.level == 2 and not strategy.needs_server_pruning and strategy.masks.equal(masks)
    assert masks.num_kept("model.features.0.weight") == kept_after_levels(64 * 16, 0.3, 2)[-1]
    w = "model.features.0.weight"
    assert torch.equal(strategy.global_state[w], untrained[w] * masks.masks[w])
    assert not torch.equal(module.model.features[0].weight.detach(), untrained[w] * masks.masks[w])  # the module did train
    assert run_server_pruning(strategy, module, splits=splits, partition=part) is None  # nothing left to do


# ----------------------------------------------------------------------------- server samples


def test_shared_sample_takes_a_proportional_share_of_every_client():
    clients = [np.arange(0, 10), np.arange(10, 40), np.arange(40, 100)]
    idx = shared_sample_indices(clients, size=10, seed=0)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert [int(((idx >= c.min()) & (idx <= c.max())).sum()) for c in clients] == [1, 3, 6]
    assert np.array_equal(idx, shared_sample_indices(clients, size=10, seed=0))
    assert not np.array_equal(idx, shared_sample_indices(clients, size=10, seed=1))
    part = make_partition("iid", np.zeros(100, dtype=np.int64), 4, seed=0)
    assert len(shared_sample_indices(part, size=8, seed=0)) == 8
    with pytest.raises(DataError, match=r"`size` must be an int in \[1, 100\]"):
        shared_sample_indices(clients, size=101, seed=0)


def test_biased_sample_keeps_only_the_chosen_groups():
    labels = np.array([0, 1, 2, 1, 0, 2, 2, 1])
    assert biased_sample_indices(labels, keep=[2]).tolist() == [2, 5, 6]
    two = biased_sample_indices(torch.tensor(labels), keep=[0, 1], size=3, seed=0)
    assert len(two) == 3 and set(labels[two].tolist()) <= {0, 1}
    with pytest.raises(DataError, match=r"no sample belongs to the groups \[7\]"):
        biased_sample_indices(labels, keep=[7])
    with pytest.raises(DataError, match=r"`size` must be an int in \[1, 3\]"):
        biased_sample_indices(labels, keep=[2], size=4)
    ds = TensorDataset(torch.arange(8.0).unsqueeze(1), torch.tensor(labels))
    xs = torch.cat([b[0] for b in sample_loader(ds, [2, 5, 6], batch_size=2, seed=0)]).flatten().sort().values
    assert xs.tolist() == [2.0, 5.0, 6.0]
