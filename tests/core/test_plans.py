"""Pruning plans: parity with torch-pruning on every registry model, exact recovery, sparse-model
equivalence, nesting, JSON, hand-computed index maps and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.plans import Plan, Planner, resize_module
from lightning_fedprune.errors import ConfigError, ModelError, PayloadError
from lightning_fedprune.models import create_model, list_models, model_info

RATIOS = (0.25, 0.5, 0.8)
MODELS = [*list_models(), "timm:resnet18"]
# only where the defaults are needlessly large (same architecture, narrower)
KWARGS = {
    "lstm_lm": {"vocab_size": 40, "embed_dim": 12, "hidden_size": 10},
    "alexnet_cifar": {"hidden": (512, 256)},
}
_CACHE: dict[str, tuple] = {}


def setup(name: str):
    """(model, info, planner), built once per model (the planner never holds the model)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        kw = KWARGS.get(name, {})
        model = create_model(name, **kw)
        info = model_info(name, **kw)
        planner = Planner.from_module(model, info.example_input(1), unprunable=info.unprunable)
        _CACHE[name] = (model, info, planner)
    return _CACHE[name]


def fresh(name: str) -> nn.Module:
    """A full-size model of ``name`` (a copy: cheaper than initialising a new one)."""
    return copy.deepcopy(setup(name)[0])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equality means bit-identical (-0.0 != 0.0)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def randomized(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Every float tensor random (BN statistics and biases non-zero; variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            r = torch.randn(v.shape, generator=gen) * 0.3
            out[k] = r.abs() + 0.5 if k.endswith("running_var") else r
        else:
            out[k] = v.clone()
    return out


def sub_model(name: str, plan: Plan, state: dict[str, torch.Tensor]) -> nn.Module:
    model = fresh(name)
    resize_module(model, plan.sub_shapes())
    model.load_state_dict(plan.extract(state))
    return model


def tp_prune(name: str, ratio: float):
    """torch-pruning's own pruning (FedMP's importance) of a deep copy; returns (model, kept per root name)."""
    model, info, _ = setup(name)
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    names = {m: n for n, m in modules.items()}
    ignored = [modules[u] for u in info.unprunable]
    imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
    pruner = tp.pruner.MetaPruner(ref, info.example_input(1), importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
    kept = {}
    for group in pruner.step(interactive=True):
        root = group[0].dep.target.module
        size = pruner.DG.get_out_channels(root)
        pruned = set(group[0].idxs)
        kept[names[root]] = [i for i in range(size) if i not in pruned]
        group.prune()
    ref.train(model.training)
    return ref, kept


# --------------------------------------------------------------------------------------------------
# parity with torch-pruning (every registry model, three ratios)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", [m for m in MODELS if m != "lstm_lm"])
def test_sub_model_equals_torch_pruning(name, ratio):
    model, info, planner = setup(name)
    state = model.state_dict()
    ref, tp_kept = tp_prune(name, ratio)

    # same indices -> the sliced sub-model is torch-pruning's model, tensor for tensor
    plan = planner.plan_from_indices(tp_kept)
    ours = sub_model(name, plan, state)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for k in ref_sd:
        assert ours_sd[k].shape == ref_sd[k].shape, k
        assert torch.equal(ours_sd[k], ref_sd[k]), k
    assert repr(ours) == repr(ref)  # layer attributes (in/out features, channels) fixed identically
    assert plan.sub_shapes() == {k: tuple(v.shape) for k, v in ref_sd.items()}

    # FedMP's importance picks torch-pruning's channels wherever one layer writes the group
    # (residual streams are scored as the sum over writers: see test_residual_importance_sums_writers)
    ours_plan = planner.plan(state, ratio)
    single_writer = [g for g, w in enumerate(planner.group_writers) if len(w) == 1]
    assert single_writer
    for g in single_writer:
        name_g = planner.group_names[g]
        assert ours_plan.kept[g].tolist() == tp_kept[name_g], name_g
    for g, size in enumerate(planner.group_sizes):
        assert ours_plan.kept[g].numel() == max(1, int(size * (1 - ratio)))


def test_residual_importance_sums_writers():
    model, _, planner = setup("resnet32_cifar")
    state = randomized(model.state_dict())
    scores = planner.importance(state)
    g = planner.group_names.index("conv1")  # the 16-channel stream: stem conv + every stage-1 conv2
    writers = ["conv1.weight"] + [f"layer1.{i}.conv2.weight" for i in range(5)]
    expected = sum(state[k].abs().sum((1, 2, 3)) for k in writers)
    torch.testing.assert_close(scores[g], expected, rtol=1e-6, atol=0)
    assert sorted(planner.group_writers[g]) == sorted(writers)
    # a plain block conv is scored by its own filters only
    g1 = planner.group_names.index("layer1.0.conv1")
    assert torch.equal(scores[g1], state["layer1.0.conv1.weight"].abs().flatten(1).sum(1))


@pytest.mark.parametrize("ratio", RATIOS)
def test_lstm_lm_against_hand_written_reference(ratio):
    model, info, planner = setup("lstm_lm")
    state = randomized(model.state_dict())
    H, E, L = 10, 12, 2
    n = max(1, int(H * (1 - ratio)))
    assert planner.group_names == ["lstm.l0", "lstm.l1"]
    assert planner.group_writers == [("lstm.weight_ih_l0", "lstm.weight_hh_l0"), ("lstm.weight_ih_l1", "lstm.weight_hh_l1")]
    plan = planner.plan(state, ratio)
    for k in range(L):  # FedMP's neuron score: the 4 gate rows of weight_ih and weight_hh
        ih, hh = state[f"lstm.weight_ih_l{k}"], state[f"lstm.weight_hh_l{k}"]
        score = [sum(ih[g * H + j].abs().sum() + hh[g * H + j].abs().sum() for g in range(4)) for j in range(H)]
        best = sorted(range(H), key=lambda j: -float(score[j]))[:n]
        assert plan.kept[k].tolist() == sorted(best)
    k0, k1 = plan.kept[0].tolist(), plan.kept[1].tolist()
    rows = lambda keep: [g * H + j for g in range(4) for j in keep]  # noqa: E731
    ref = {
        "embedding.weight": state["embedding.weight"],
        "lstm.weight_ih_l0": state["lstm.weight_ih_l0"][rows(k0)],
        "lstm.weight_hh_l0": state["lstm.weight_hh_l0"][rows(k0)][:, k0],
        "lstm.bias_ih_l0": state["lstm.bias_ih_l0"][rows(k0)],
        "lstm.bias_hh_l0": state["lstm.bias_hh_l0"][rows(k0)],
        "lstm.weight_ih_l1": state["lstm.weight_ih_l1"][rows(k1)][:, k0],
        "lstm.weight_hh_l1": state["lstm.weight_hh_l1"][rows(k1)][:, k1],
        "lstm.bias_ih_l1": state["lstm.bias_ih_l1"][rows(k1)],
        "lstm.bias_hh_l1": state["lstm.bias_hh_l1"][rows(k1)],
        "classifier.weight": state["classifier.weight"][:, k1],
        "classifier.bias": state["classifier.bias"],
    }
    sub = plan.extract(state)
    assert list(sub) == list(ref)
    for k in ref:
        assert torch.equal(sub[k], ref[k]), k
    m = sub_model("lstm_lm", plan, state)
    assert (m.lstm.input_size, m.lstm.hidden_size, m.classifier.in_features) == (E, n, n)
    # a float64 copy is traced in float32 (one fused LSTM op) and gives the same layout
    double = Planner.from_module(copy.deepcopy(model).double(), info.example_input(1), unprunable=info.unprunable)
    assert double.layout.same_structure(planner.layout)


# --------------------------------------------------------------------------------------------------
# recovery, sparse model
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_recover_is_exact(name):
    model, _, planner = setup(name)
    state = model.state_dict()
    for ratio in RATIOS:
        plan = planner.plan(state, ratio)
        sub = plan.extract(state)
        trained = {k: (v + 1.5) if v.is_floating_point() else v + 7 for k, v in sub.items()}
        rec = plan.recover(trained, base=state)
        bsp = plan.recover(trained)
        assert list(rec) == list(state)
        back, back_bsp = plan.extract(rec), plan.extract(bsp)
        for k, full in state.items():
            mask = plan.mask(k)
            assert rec[k].shape == full.shape and rec[k].dtype == full.dtype
            assert int(mask.sum()) == trained[k].numel(), k
            # untouched positions bit-identical to the base, zero without a base
            assert torch.equal(bits(rec[k]).masked_fill(mask, 0), bits(full).masked_fill(mask, 0)), k
            assert not bsp[k].masked_fill(mask, 0).any(), k
            # kept positions are the sub-model's
            assert torch.equal(back[k], trained[k]) and torch.equal(back_bsp[k], trained[k]), k
        assert not any(v.data_ptr() == state[k].data_ptr() for k, v in rec.items())


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", MODELS)
def test_sparse_model_forward_equals_sub_model(name, ratio):
    model, info, planner = setup(name)
    state = randomized(model.state_dict())
    plan = planner.plan(state, ratio)
    sub = sub_model(name, plan, state).eval()
    sparse = fresh(name)
    sparse.load_state_dict(plan.sparse(state))
    sparse.eval()
    x = info.example_input(2)
    with torch.no_grad():
        a, b = sub(x), sparse(x)
    rel = (a - b).abs().max() / b.abs().max()
    assert rel < 1e-5, float(rel)
    residual = plan.residual(state)
    for k, v in plan.sparse(state).items():
        assert torch.equal(v + residual[k], state[k]) or not v.is_floating_point(), k


def test_zeroing_only_pruned_filters_is_not_the_sparse_model():
    """Why sparse() zeroes every coupled tensor: filters alone leak BN's shift (guards the test above)."""
    model, info, planner = setup("vgg11_bn")
    state = randomized(model.state_dict())
    plan = planner.plan(state, 0.5)
    sub = sub_model("vgg11_bn", plan, state).eval()
    filters_only = {k: v.clone() for k, v in state.items()}
    for k in state:
        if k.startswith("features") and k.endswith("weight") and state[k].dim() == 4:
            filters_only[k] = filters_only[k] * plan.mask(k).all(dim=(1, 2, 3), keepdim=True)
    leaky = fresh("vgg11_bn")
    leaky.load_state_dict(filters_only)
    x = info.example_input(2)
    with torch.no_grad():
        a, b = sub(x), leaky.eval()(x)
    assert (a - b).abs().max() / b.abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# nesting, JSON
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_nested_plans_compose(name):
    model, info, planner = setup(name)
    state = randomized(model.state_dict())
    outer = planner.plan(state, 0.5)
    sub = sub_model(name, outer, state)
    inner_planner = Planner.from_module(sub, info.example_input(1), unprunable=info.unprunable)
    assert inner_planner.group_names == planner.group_names
    assert inner_planner.group_sizes == list(outer.kept_counts)
    inner = inner_planner.plan(sub.state_dict(), 0.5)
    composed = outer.compose(inner)
    for o, c in zip(outer.kept, composed.kept):
        assert set(c.tolist()) <= set(o.tolist())
        assert torch.equal(c, torch.sort(c).values)
    # the sparse model's filter norms are the sub-model's: importance agrees, so nesting == within
    expected = planner.plan(outer.sparse(state), 0.5, within=outer)
    assert all(torch.equal(a, b) for a, b in zip(composed.kept, expected.kept))
    # and slicing the sub-model again is slicing the full model with the composed plan
    twice = inner.extract(sub.state_dict())
    once = composed.extract(state)
    assert all(torch.equal(twice[k], once[k]) for k in once)


@pytest.mark.parametrize("name", MODELS)
def test_json_round_trip(name):
    model, _, planner = setup(name)
    state = model.state_dict()
    plan = planner.plan(state, 0.5)
    text = json.dumps(plan.to_json())
    data = json.loads(text)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return isinstance(v, (str, int)) and not isinstance(v, bool) or v is None

    assert plain(data)
    back = Plan.from_json(data)
    assert back == plan and back.ratio == 0.5
    planner.check(back)
    real = sub_model(name, plan, state).state_dict()
    assert back.sub_shapes() == {k: tuple(v.shape) for k, v in real.items()}
    assert all(torch.equal(back.extract(state)[k], real[k]) for k in real)
    no_ratio = planner.plan_from_keep(state, [max(1, s // 3) for s in planner.group_sizes])
    assert Plan.from_json(json.loads(json.dumps(no_ratio.to_json()))) == no_ratio


# --------------------------------------------------------------------------------------------------
# hand-computed index maps and tie-breaking
# --------------------------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)  # 4x4 -> 2x2
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.classifier(torch.relu(self.fc(x)))


def test_hand_computed_index_maps_and_ties():
    model = _Tiny()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 0] = torch.tensor([3.0, 1.0, -3.0, 3.0])  # neuron scores 3, 1, 3, 3
        model.conv.weight.zero_()
        model.conv.weight[:, 0, 0, 0] = torch.tensor([1.0, -2.0, 1.5])  # filter scores 1, 2, 1.5
    planner = Planner.from_module(model, torch.zeros(1, 1, 4, 4), unprunable=("classifier",))
    assert planner.group_names == ["fc", "conv"] and planner.group_sizes == [4, 3]
    assert model.training  # mode restored
    plan = planner.plan(model.state_dict(), 0.5)
    assert plan.kept[0].tolist() == [0, 2]  # ties among 0, 2, 3: lower index first
    assert plan.kept[1].tolist() == [1]  # int(3 * 0.5) = 1: the largest filter
    idx = {k: plan.indices(k) for k in plan.keys()}
    assert idx["fc.weight"][0].tolist() == [0, 2]
    assert idx["fc.weight"][1].tolist() == [4, 5, 6, 7]  # channel 1 -> flattened block 4..7
    assert idx["fc.bias"][0].tolist() == [0, 2]
    assert idx["classifier.weight"][0] is None and idx["classifier.weight"][1].tolist() == [0, 2]
    assert idx["classifier.bias"] == (None,)
    assert idx["conv.weight"][0].tolist() == [1] and idx["conv.weight"][1:] == (None, None, None)
    for k in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert idx[k][0].tolist() == [1]
    assert idx["bn.num_batches_tracked"] == ()
    assert plan.sub_shapes()["fc.weight"] == (2, 4)
    # kept / total elements: conv.weight 9/27, conv.bias 1/3, bn 4/12 (+ num_batches_tracked 1/1),
    # fc.weight 8/48, fc.bias 2/4, classifier.weight 4/8, classifier.bias 2/2
    assert plan.kept_fraction() == pytest.approx(31 / 105)
    m = plan.mask("fc.weight")
    assert m.sum() == 8 and m[0, 4] and not m[0, 0] and not m[1, 4]
    with pytest.raises(ConfigError, match="group 'conv'.*sorted"):
        planner.plan_from_indices([[0, 2], [2, 1]])
    with pytest.raises(ConfigError, match="group 'fc'.*empty"):
        planner.plan_from_indices({"fc": []})
    with pytest.raises(ConfigError, match=r"group 'conv'.*\[0, 3\)"):
        planner.plan_from_indices({"conv": [0, 3]})
    with pytest.raises(ConfigError, match="unknown group 'nope'"):
        planner.plan_from_keep(model.state_dict(), {"nope": 1})
    with pytest.raises(ConfigError, match="keep count of group 'conv'"):
        planner.plan_from_keep(model.state_dict(), {"conv": 4})
    scores = planner.importance(model.state_dict())
    assert [s.tolist() for s in scores] == [[3.0, 1.0, 3.0, 3.0], [1.0, 2.0, 1.5]]
    assert planner.plan(None, 0.5, scores=scores) == plan
    with pytest.raises(ConfigError, match="`scores` must hold one score per channel"):
        planner.plan(None, 0.5, scores=scores[:1])
    keep = planner.plan_from_keep(model.state_dict(), {1: 2})
    assert keep.kept[0].tolist() == [0, 1, 2, 3] and keep.kept[1].tolist() == [1, 2]
    nested = planner.plan(model.state_dict(), 0.5, within=keep)
    assert nested.kept[0].tolist() == [0, 2] and nested.kept[1].tolist() == [1]


def test_unprunable_patterns_and_lightning_prefix():
    from lightning_fedprune.config import FederatedClassifier

    module = FederatedClassifier("cnn_mnist")
    planner = Planner.from_module(module, torch.zeros(1, 1, 28, 28), unprunable=module.federated_unprunable)
    assert planner.unprunable_modules == ("model.classifier",)
    assert planner.group_names == ["model.fc.0", "model.features.3", "model.features.0"]
    plan = planner.plan(module.state_dict(), 0.5)
    assert plan.indices("model.classifier.weight")[0] is None
    _, _, bare = setup("cnn_mnist")
    assert planner.fingerprint != bare.fingerprint  # keys differ ("model." prefix)
    everything = Planner.from_module(module.model, torch.zeros(1, 1, 28, 28), unprunable=("feat*", "fc", "classifier"))
    assert everything.num_groups == 0


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan"), float("inf"), True, "0.5"])
def test_bad_ratio(ratio):
    model, _, planner = setup("cnn_mnist")
    with pytest.raises(ConfigError, match="ratio"):
        planner.plan(model.state_dict(), ratio)


def test_plan_of_another_architecture():
    model, _, planner = setup("cnn_mnist")
    other_model, _, other = setup("mlp")
    plan = other.plan(other_model.state_dict(), 0.5)
    with pytest.raises(ConfigError, match=f"fingerprint {plan.fingerprint}.*{planner.fingerprint}"):
        planner.check(plan)
    with pytest.raises(ConfigError, match="fingerprint"):
        planner.plan(model.state_dict(), 0.5, within=plan)
    with pytest.raises(ConfigError, match="does not know"):
        plan.extract(model.state_dict())
    state = model.state_dict()
    state["fc.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConfigError, match="'fc.0.weight' has shape"):
        planner.plan(model.state_dict(), 0.5).extract(state)


def test_recover_rejects_wrong_shape_and_modifies_nothing():
    model, _, planner = setup("vgg11_bn")
    state = model.state_dict()
    plan = planner.plan(state, 0.5)
    sub = plan.extract(state)
    key = "features.4.weight"
    sub[key] = torch.zeros(3, 3, 3, 3)
    base = {k: v.clone() for k, v in state.items()}
    sub_copy = {k: v.clone() for k, v in sub.items()}
    with pytest.raises(PayloadError, match=f"'{key}' has shape"):
        plan.recover(sub, base=base)
    assert all(torch.equal(base[k], state[k]) for k in state)
    assert all(torch.equal(sub[k], sub_copy[k]) for k in sub)
    with pytest.raises(PayloadError, match="does not know"):
        plan.recover({"nope": torch.zeros(1)})


def test_corrupted_json_is_rejected():
    model, _, planner = setup("cnn_mnist")
    good = planner.plan(model.state_dict(), 0.5).to_json()
    cases = [
        lambda d: d.update(kept=d["kept"][:-1]),
        lambda d: d["kept"].__setitem__(0, "zz" + d["kept"][0][2:]),
        lambda d: d["kept"].__setitem__(2, "0" * len(d["kept"][2])),
        lambda d: d.update(fingerprint="0" * 16),
        lambda d: d["layout"]["tensors"][0][1].__setitem__(0, 999),
        lambda d: d["layout"]["maps"][0]["parts"][0].__setitem__(1, 10_000),
        lambda d: d.update(ratio=0.5),
        lambda d: d.update(extra=1),
    ]
    for corrupt in cases:
        data = json.loads(json.dumps(good))
        corrupt(data)
        with pytest.raises(PayloadError):
            Plan.from_json(data)


class _PadShortcutBlock(nn.Module):
    """CIFAR ResNet option A: the parameter-free shortcut pads channels with F.pad."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.classifier = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        return self.classifier((self.conv2(x) + short).mean((2, 3)))


def test_untraceable_models_raise_model_error():
    with pytest.raises(ModelError, match="layer 'conv[12]'.*element-wise"):
        Planner.from_module(_PadShortcutBlock(), torch.zeros(1, 3, 8, 8), unprunable=("classifier",))
    with pytest.raises(ModelError, match="in layer 'conv1'"):  # the forward itself fails there
        Planner.from_module(_PadShortcutBlock(), torch.zeros(1, 3, 4, 4, 1), unprunable=("classifier",))
    with pytest.raises(ModelError, match="layer 'conv'.*grouped"):
        grouped = nn.Sequential()
        grouped.add_module("stem", nn.Conv2d(3, 8, 1))
        grouped.add_module("conv", nn.Conv2d(8, 8, 3, groups=2))
        Planner.from_module(grouped, torch.zeros(1, 3, 5, 5))


def test_resize_module_round_trip_and_errors():
    model, _, planner = setup("resnet32_cifar")
    state = model.state_dict()
    a, b = planner.plan(state, 0.25), planner.plan(state, 0.8)
    m = fresh("resnet32_cifar").eval()
    params_before = {n for n, _ in m.named_parameters()}
    for plan in (a, b, a, planner.full_plan()):
        resize_module(m, plan.sub_shapes())
        m.load_state_dict(plan.extract(state))
        assert {n for n, _ in m.named_parameters()} == params_before
        assert all(p.requires_grad for p in m.parameters())
        m(torch.zeros(1, 3, 32, 32))
    assert all(torch.equal(m.state_dict()[k], state[k]) for k in state)
    with pytest.raises(ModelError, match="no parameter or buffer 'nope.weight'"):
        resize_module(m, {"nope.weight": (1,)})

    # PyTorch's own modules whose attributes it cannot fix are refused (bare parameters of a model's
    # own modules are resized: see test_plans_any_model.py)
    holder = nn.Sequential(nn.Linear(2, 4), nn.Bilinear(4, 4, 2))
    with pytest.raises(ModelError, match="module '1' \\(Bilinear\\)"):
        resize_module(holder, {"0.weight": (3, 2), "0.bias": (3,), "1.weight": (2, 3, 3)})
    assert holder[0].weight.shape == (4, 2)  # nothing changed


def test_language_model_module_with_metrics_prunes_its_lstm():
    # a LightningModule holding torchmetrics submodules: the LSTM must still be traced (regression)
    from lightning_fedprune.config import FederatedLanguageModel
    from lightning_fedprune.runtime import build_planner

    module = FederatedLanguageModel("lstm_lm", lr=1.0, vocab_size=50, embed_dim=8, hidden_size=6)
    module.example_input_array = torch.zeros((1, 5), dtype=torch.long)
    planner = build_planner(module)
    assert planner.group_names == ["model.lstm.l0", "model.lstm.l1"] and planner.group_sizes == [6, 6]
    plan = planner.plan(module.federated_state(), 0.5)
    assert plan.sub_shapes()["model.lstm.weight_hh_l1"] == (12, 3)
    assert plan.sub_shapes()["model.classifier.weight"] == (50, 3)
    assert hasattr(module, "val_nll")  # the metrics are back
