"""Plans for models outside the registry: every model either plans exactly or is refused with a
message naming the layer (tracing failures, recurrent layers, grouped convolutions, wiring)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.lstm_pruning import LSTMPruner
from lightning_fedprune.core.plans import Plan, Planner, resize_module
from lightning_fedprune.errors import ConfigError, ModelError, PayloadError


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


# --------------------------------------------------------------------------------------------------
# recurrent layers
# --------------------------------------------------------------------------------------------------
class _GRUTagger(nn.Module):
    def __init__(self, num_layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 5)
        self.gru = nn.GRU(5, 6, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
        self.classifier = nn.Linear(12 if bidirectional else 6, 2)

    def forward(self, x):
        return self.classifier(self.gru(torch.tanh(self.encoder(x)))[0])


class _BiGRUTagger(_GRUTagger):
    def __init__(self) -> None:
        super().__init__(bidirectional=True)


def test_gru_hidden_units_pruned_with_their_three_gates_or_kept_whole():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    model = _randomize(_GRUTagger())
    state = model.state_dict()
    planner = Planner.from_module(model, x, unprunable=("classifier",))
    assert planner.group_names == ["gru.l0", "encoder"]
    plan = planner.plan(state, 0.5)  # 3 of 6 hidden units, 2 of 5 encoder neurons
    H = 6
    ih, hh = state["gru.weight_ih_l0"], state["gru.weight_hh_l0"]
    score = [sum(float(ih[g * H + j].abs().sum() + hh[g * H + j].abs().sum()) for g in range(3)) for j in range(H)]
    units = sorted(sorted(range(H), key=lambda j: -score[j])[:3])
    assert plan.kept[0].tolist() == units
    rows = [g * H + j for g in range(3) for j in units]  # reset, update and new gate of each kept unit
    enc = plan.kept[1].tolist()
    sub_state = plan.extract(state)
    assert torch.equal(sub_state["gru.weight_ih_l0"], ih[rows][:, enc])
    assert torch.equal(sub_state["gru.weight_hh_l0"], hh[rows][:, units])
    assert torch.equal(sub_state["gru.bias_hh_l0"], state["gru.bias_hh_l0"][rows])
    assert torch.equal(sub_state["classifier.weight"], state["classifier.weight"][:, units])
    sub = copy.deepcopy(model)
    resize_module(sub, plan.sub_shapes())
    sub.load_state_dict(sub_state)
    assert (sub.gru.input_size, sub.gru.hidden_size) == (2, 3)
    sparse = copy.deepcopy(model)
    sparse.load_state_dict(plan.sparse(state))
    with torch.no_grad():
        a, b = sub(x), sparse(x)
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6  # measured 6e-8
    # kept whole: only its input features follow the encoder
    whole = Planner.from_module(model, x, unprunable=("classifier", "gru"))
    assert whole.group_names == ["encoder"]
    plan = whole.plan(state, 0.4)
    kept = plan.kept[0].tolist()
    assert plan.sub_shapes()["gru.weight_ih_l0"] == (18, 3) and plan.sub_shapes()["gru.weight_hh_l0"] == (18, 6)
    assert torch.equal(plan.extract(state)["gru.weight_ih_l0"], ih[:, kept])


# --------------------------------------------------------------------------------------------------
# LSTM layer k: Planner and LSTMPruner score the same weights
# --------------------------------------------------------------------------------------------------
class _LSTM3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 5)
        self.lstm = nn.LSTM(5, 6, num_layers=3, batch_first=True)
        self.classifier = nn.Linear(6, 4)

    def forward(self, x):
        return self.classifier(self.lstm(torch.tanh(self.encoder(x)))[0])


def test_three_layer_lstm_planner_and_lstm_pruner_pick_the_same_units():
    model = _randomize(_LSTM3(), seed=3)
    x = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(1))
    state = model.state_dict()
    H, keep = 6, 3
    # independent computation: each layer's unit score over the FULL weights (every column)
    expected = []
    for k in range(3):
        ih, hh = state[f"lstm.weight_ih_l{k}"], state[f"lstm.weight_hh_l{k}"]
        score = [sum(float(ih[g * H + j].abs().sum() + hh[g * H + j].abs().sum()) for g in range(4)) for j in range(H)]
        expected.append(sorted(sorted(range(H), key=lambda j: -score[j])[:keep]))
    # the full-column and the reduced-column scores disagree on layer 1 for this model
    reduced = state["lstm.weight_ih_l1"][:, expected[0]].abs().sum(1) + state["lstm.weight_hh_l1"].abs().sum(1)
    assert sorted(torch.argsort(reduced.view(4, H).sum(0), descending=True)[:keep].tolist()) != expected[1]

    planner = Planner.from_module(model, x, unprunable=("classifier",))
    assert planner.group_names == ["lstm.l0", "lstm.l1", "lstm.l2", "encoder"]
    plan = planner.plan_from_keep(state, {"lstm.l0": keep, "lstm.l1": keep, "lstm.l2": keep})
    assert [plan.kept[g].tolist() for g in (0, 1, 2)] == expected

    pruned = copy.deepcopy(model)
    pruner = LSTMPruner()
    graph = tp.DependencyGraph().build_dependency(pruned, x, customized_pruners={nn.LSTM: pruner}, verbose=False)
    removed = [j for j in range(H) if j not in expected[2]]
    graph.get_pruning_group(pruned.lstm, pruner.prune_out_channels, removed).prune()
    sub = plan.extract(state)
    for k, v in pruned.state_dict().items():
        assert torch.equal(sub[k], v), k


# --------------------------------------------------------------------------------------------------
# tracing failures and grouped convolutions name a layer
# --------------------------------------------------------------------------------------------------
def test_channel_shuffle_tracing_failure_names_the_layers():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(ModelError, match=r"ShuffleNetV2.*after layer\(s\) \['stage4\.1\.branch2\.6'.*ZeroDivisionError"):
        Planner.from_module(model, torch.zeros(1, 3, 64, 64), unprunable=("fc",))


def test_grouped_convolution_hint_names_the_layers_that_work():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 1))
    model.add_module("bn", nn.BatchNorm2d(8))
    model.add_module("conv", nn.Conv2d(8, 8, 3, groups=2))
    model.add_module("head", nn.Conv2d(8, 4, 1))
    x = torch.zeros(1, 3, 5, 5)
    with pytest.raises(ModelError, match="'conv' is a grouped convolution.*HINT: list 'conv', 'stem' as unprunable"):
        Planner.from_module(model, x, unprunable=("head",))
    with pytest.raises(ModelError, match="HINT: list 'stem' as unprunable"):  # not enough: 'stem' feeds it
        Planner.from_module(model, x, unprunable=("head", "conv"))
    planner = Planner.from_module(model, x, unprunable=("head", "conv", "stem"))
    assert planner.num_groups == 0


def test_regnet_plans_with_the_grouped_convolution_hint():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("regnetx_002", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match=r"'s1\.b1\.conv2\.conv' is a grouped convolution.*13 grouped") as info:
        Planner.from_module(model, x, unprunable=("head.fc",))
    hint = str(info.value).split("HINT: list ")[1]
    names = hint[: hint.index(" as unprunable")].replace("'", "").split(", ")
    assert names[:2] == ["s1.b1.conv2.conv", "s1.b1.conv1.conv"] and len(names) == 26
    planner = Planner.from_module(model, x, unprunable=("head.fc", *names))  # passes the self-check
    assert planner.group_names == [
        "s4.b1.downsample.conv", "s3.b1.downsample.conv", "s2.b1.downsample.conv", "s1.b1.downsample.conv", "stem.conv"
    ]


# --------------------------------------------------------------------------------------------------
# wiring is part of the fingerprint
# --------------------------------------------------------------------------------------------------
class _Cat(nn.Module):
    def __init__(self, swapped: bool = False, relu: bool = False, width: int = 6) -> None:
        super().__init__()
        self.swapped, self.relu = swapped, relu
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, width, 3, padding=1)
        self.classifier = nn.Conv2d(4 + width, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.relu:
            a, b = torch.relu(a), torch.relu(b)
        return self.classifier(torch.cat([b, a] if self.swapped else [a, b], 1))


def test_a_plan_for_other_wiring_is_refused_with_that_reason():
    x = torch.zeros(1, 3, 4, 4)
    plain = Planner.from_module(_Cat(), x, unprunable=("classifier",))
    swapped_model = _Cat(swapped=True)
    swapped = Planner.from_module(swapped_model, x, unprunable=("classifier",))
    assert plain.layout.shapes == swapped.layout.shapes  # same keys and shapes
    assert plain.layout.shapes_fingerprint == swapped.layout.shapes_fingerprint
    assert plain.fingerprint != swapped.fingerprint
    plan = swapped.plan(swapped_model.state_dict(), 0.5)
    with pytest.raises(ConfigError, match="same tensors but other wiring"):
        plain.check(plan)
    with pytest.raises(ConfigError, match="other wiring"):
        plain.plan(swapped_model.state_dict(), 0.5, within=plan)
    # the same model with other unprunable layers: same fingerprint, other groups
    other = Planner.from_module(_Cat(), x, unprunable=("classifier", "a"))
    assert other.fingerprint == plain.fingerprint
    with pytest.raises(ConfigError, match="other unprunable layers"):
        plain.check(other.plan(_Cat().state_dict(), 0.5))
    # inputs of the same width behind element-wise operations: the order is still part of the wiring
    fingerprints = {
        Planner.from_module(_Cat(swapped=s, relu=True, width=4), x, unprunable=("classifier",)).fingerprint
        for s in (False, True)
    }
    assert len(fingerprints) == 2


# --------------------------------------------------------------------------------------------------
# every model either plans exactly or is refused naming the layer
# --------------------------------------------------------------------------------------------------
class _LNMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.norm(self.fc(x))))


class _GNCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.classifier = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.classifier(torch.relu(self.norm(self.conv(x)))).mean((2, 3))


class _Attention(nn.Module):
    """timm's attention block, written out: qkv reshaped into (3, heads, head_dim)."""

    def __init__(self, dim: int = 16, num_heads: int = 4, hard_coded: bool = False) -> None:
        super().__init__()
        self.hard_coded = hard_coded
        if not hard_coded:
            self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        heads, head_dim = (4, 4) if self.hard_coded else (self.num_heads, self.head_dim)
        q, k, v = self.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, heads * head_dim))


class _AttentionNet(nn.Module):
    def __init__(self, hard_coded: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = _Attention(hard_coded=hard_coded)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.attn(torch.relu(self.embed(x)))))


class _MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.classifier = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        return self.classifier(self.mha(h, h, h, need_weights=False)[0])


class _ConcatCNN(_Cat):
    pass


class _FlattenCNN(nn.Module):
    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.classifier = nn.Linear(5, 2)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = x.permute(0, 2, 3, 1).flatten(1) if self.channels_last else x.flatten(1)
        return self.classifier(torch.relu(self.fc(x)))


class _LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        return self.classifier(self.lstm(self.embedding(x))[0])


def _timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return model, (model.pretrained_cfg["classifier"],)


def _torchvision(name: str, head: str, **kwargs):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs), (head,)


_gen = torch.Generator().manual_seed(0)
# name -> (builder of (model, unprunable), example input)
CASES = {
    "resnet10t": (lambda: _timm("resnet10t"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "mobilenetv3_small_050": (lambda: _timm("mobilenetv3_small_050"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "efficientnet_b0": (lambda: _timm("efficientnet_b0"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "densenet121": (lambda: _timm("densenet121"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "convnext_atto": (lambda: _timm("convnext_atto"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "vit_tiny_patch16_224": (
        lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
        torch.randn(2, 3, 32, 32, generator=_gen),
    ),
    "deit_tiny_patch16_224": (
        lambda: _timm("deit_tiny_patch16_224", img_size=32, patch_size=8),
        torch.randn(2, 3, 32, 32, generator=_gen),
    ),
    "tv_resnet50": (lambda: _torchvision("resnet50", "fc"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "tv_mobilenet_v2": (lambda: _torchvision("mobilenet_v2", "classifier.1"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "tv_googlenet": (
        lambda: _torchvision("googlenet", "fc", aux_logits=False, init_weights=True),
        torch.randn(2, 3, 64, 64, generator=_gen),
    ),
    "tv_squeezenet1_1": (lambda: _torchvision("squeezenet1_1", "classifier.1"), torch.randn(2, 3, 64, 64, generator=_gen)),
    "layernorm_mlp": (lambda: (_LNMLP(), ("classifier",)), torch.randn(4, 6, generator=_gen)),
    "groupnorm_cnn": (lambda: (_GNCNN(), ("classifier",)), torch.randn(2, 3, 6, 6, generator=_gen)),
    "attention_reshape": (lambda: (_AttentionNet(), ("classifier",)), torch.randn(2, 5, 6, generator=_gen)),
    "multihead_attention": (lambda: (_MHANet(), ("classifier",)), torch.randn(2, 5, 6, generator=_gen)),
    "concat_cnn": (lambda: (_ConcatCNN(), ("classifier",)), torch.randn(2, 3, 4, 4, generator=_gen)),
    "flatten_cnn": (lambda: (_FlattenCNN(), ("classifier",)), torch.randn(2, 3, 6, 6, generator=_gen)),
    "lstm_tagger": (lambda: (_LSTMTagger(), ("classifier",)), torch.randint(0, 20, (2, 7), generator=_gen)),
    "lstm_3_layers": (lambda: (_LSTM3(), ("classifier",)), torch.randn(2, 7, 3, generator=_gen)),
    "gru_2_layers": (lambda: (_GRUTagger(num_layers=2), ("classifier",)), torch.randn(2, 7, 3, generator=_gen)),
}
REFUSED = {
    "channels_last_flatten": (
        lambda: (_FlattenCNN(channels_last=True), ("classifier",)),
        torch.randn(2, 3, 6, 6, generator=_gen),
        r"group 'conv' cannot be pruned.*relative error.*the Linear 'fc' reads these channels through a flatten.*"
        r"channels-last.*HINT: list 'conv' as unprunable",
    ),
    "attention_without_head_attributes": (
        lambda: (_AttentionNet(hard_coded=True), ("classifier",)),
        torch.randn(2, 5, 6, generator=_gen),
        r"group 'attn.qkv' cannot be pruned.*fails: RuntimeError: shape .* is invalid.*Its layers: 'attn.qkv', "
        r"'attn.proj'.*HINT: list 'attn.qkv' as unprunable",
    ),
    "bidirectional_gru": (
        lambda: (_BiGRUTagger(), ("classifier",)),
        torch.randn(2, 4, 3, generator=_gen),
        r"GRU 'gru' is bidirectional.*HINT: list it as unprunable",
    ),
}
_BUILT: dict[str, tuple] = {}


def _built(name: str):
    """(model with random state, example input, planner), once per case."""
    if name not in _BUILT:
        build, x = CASES[name]
        model, unprunable = build()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, t in model.state_dict().items():
                if t.is_floating_point():  # random statistics and parameters, well scaled
                    fan_in = max(1, t.numel() // t.shape[0]) if t.dim() > 1 else 1
                    r = torch.randn(t.shape, generator=gen) / fan_in**0.5
                    t.copy_(r.abs() + 0.5 if k.endswith("running_var") else r)
        _BUILT[name] = (model.eval(), x, Planner.from_module(model, x, unprunable=unprunable))
    return _BUILT[name]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor, so that equality means bit-identical (-0.0 != 0.0)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _sub(model: nn.Module, plan, state) -> nn.Module:
    sub = copy.deepcopy(model)
    resize_module(sub, plan.sub_shapes())
    sub.load_state_dict(plan.extract(state))
    return sub.eval()


class _MaskedNorm(nn.Module):
    """Reference for a norm over pruned channels: statistics over the kept channels only."""

    def __init__(self, norm: nn.Module, kept: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.norm, self.kept, self.dim = norm, kept, channel_dim

    def forward(self, x):
        x = x.movedim(self.dim, -1)
        out = torch.zeros_like(x)
        k = x[..., self.kept]
        w, b = self.norm.weight[self.kept], self.norm.bias[self.kept]
        if isinstance(self.norm, nn.GroupNorm):  # per original group, over its kept channels (and positions)
            size = self.norm.num_channels // self.norm.num_groups
            for g in range(self.norm.num_groups):
                cols = [i for i, c in enumerate(self.kept.tolist()) if c // size == g]
                part = k[..., cols]
                dims = tuple(range(1, part.dim()))
                mean = part.mean(dims, keepdim=True)
                var = part.var(dims, unbiased=False, keepdim=True)
                out[..., self.kept[cols]] = (part - mean) / torch.sqrt(var + self.norm.eps) * w[cols] + b[cols]
        else:
            mean, var = k.mean(-1, keepdim=True), k.var(-1, unbiased=False, keepdim=True)
            out[..., self.kept] = (k - mean) / torch.sqrt(var + self.norm.eps) * w + b
        return out.movedim(-1, self.dim)


def _reference(model: nn.Module, plan, state) -> nn.Module:
    """The sparse model; norms over pruned channels replaced by :class:`_MaskedNorm`."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(plan.sparse(state))
    for name, m in list(ref.named_modules()):
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and f"{name}.weight" in plan.layout.shapes:
            kept = plan.indices(f"{name}.weight")[-1]
            if kept is None or kept.numel() == m.weight.shape[-1]:
                continue
            channels_first = isinstance(m, nn.GroupNorm) or type(m).__name__ == "LayerNorm2d"
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, _MaskedNorm(m, kept, 1 if channels_first else -1))
    return ref.eval()


def _tp_pruned(model: nn.Module, x, planner, plan) -> nn.Module:
    """torch-pruning's own pruning functions, group by group, removing what ``plan`` prunes."""
    ref = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(ref, x, customized_pruners={nn.LSTM: LSTMPruner()}, verbose=False)
    modules = dict(ref.named_modules())
    for g, name in enumerate(planner.group_names):
        root = modules[name]
        pruned = [i for i in range(planner.group_sizes[g]) if i not in set(plan.kept[g].tolist())]
        if pruned:
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, pruned).prune()
    for m in ref.modules():  # torch-pruning's ViT recipe: heads follow the qkv rows
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            m.num_heads = m.qkv.out_features // (3 * m.head_dim)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    return ref.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_any_model_plans_exactly(name):
    model, x, planner = _built(name)
    state = model.state_dict()
    assert planner.num_groups > 0
    for ratio in (0.3, 0.6):
        plan = planner.plan(state, ratio)
        assert any(k.numel() < s for k, s in zip(plan.kept, plan.group_sizes)), "nothing pruned"
        sub = _sub(model, plan, state)
        with torch.no_grad():
            a, b = sub(x), _reference(model, plan, state)(x)
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 1e-6, rel  # measured: at most 4.2e-7
        # recovery is exact: untouched positions bit-identical, kept positions the sub-model's
        trained = {k: v + 1.5 if v.is_floating_point() else v for k, v in plan.extract(state).items()}
        rec = plan.recover(trained, base=state)
        back = plan.extract(rec)
        for k, full in state.items():
            mask = plan.mask(k)
            assert torch.equal(_bits(rec[k]).masked_fill(mask, 0), _bits(full).masked_fill(mask, 0)), k
            assert torch.equal(_bits(back[k]), _bits(trained[k])), k
        # torch-pruning's own pruning with the same channels gives the same tensors
        if not any(isinstance(m, nn.RNNBase) for m in model.modules()):  # recurrent: see the LSTM/GRU tests
            ref = _tp_pruned(model, x, planner, plan)
            ref_sd = ref.state_dict()
            assert {k: tuple(v.shape) for k, v in ref_sd.items()} == plan.sub_shapes()
            reordered = []
            for k, v in plan.extract(state).items():
                if torch.equal(v, ref_sd[k]):
                    continue
                # torch-pruning 1.6's LayerNorm pruner keeps its channels in set order (it calls
                # `keep_idxs.sort()`, which does not sort in place): same values, other order
                assert isinstance(model.get_submodule(k.rpartition(".")[0]), nn.LayerNorm), k
                assert torch.equal(v.sort().values, ref_sd[k].sort().values), k
                reordered.append(k)
            if not reordered and not isinstance(getattr(model, "mha", None), nn.MultiheadAttention):
                with torch.no_grad():  # MultiheadAttention: torch-pruning shrinks head_dim, plans drop heads
                    assert torch.allclose(ref(x), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(REFUSED))
def test_model_refused_naming_the_layer(name):
    build, x, match = REFUSED[name]
    model, unprunable = build()
    with pytest.raises(ModelError, match=match):
        Planner.from_module(model, x, unprunable=unprunable)


def test_attention_keeps_whole_heads_the_same_in_q_k_and_v():
    model, x, planner = _built("vit_tiny_patch16_224")
    state = model.state_dict()
    g = planner.group_names.index("blocks.0.attn.qkv")
    assert planner.group_sizes[g] == 576 and planner.layout.group_units(g) == (3, 64)
    for ratio, heads in ((0.3, 2), (0.6, 1)):  # int(3 * 0.7) = 2, int(3 * 0.4) = 1 of 3 heads
        plan = planner.plan(state, ratio)
        kept = plan.kept[g]
        blocks = sorted({int(c) % 192 // 64 for c in kept})
        assert len(blocks) == heads and kept.numel() == 3 * 64 * heads
        assert kept.tolist() == [s * 192 + h * 64 + j for s in range(3) for h in blocks for j in range(64)]
        assert plan.indices("blocks.0.attn.proj.weight")[1].tolist() == [h * 64 + j for h in blocks for j in range(64)]
        sub = _sub(model, plan, state)
        assert (sub.blocks[0].attn.num_heads, sub.blocks[0].attn.head_dim, sub.blocks[0].attn.attn_dim) == (heads, 64, 64 * heads)
    # an uneven split of q, k and v (what the dependency graph alone allowed) is refused
    uneven = list(range(0, 64)) + list(range(192, 320)) + list(range(384, 448))
    with pytest.raises(ConfigError, match="group 'blocks.0.attn.qkv'.*heads of q, k and v"):
        planner.plan_from_indices({"blocks.0.attn.qkv": uneven})
    with pytest.raises(ConfigError, match="multiple of 192"):
        planner.plan_from_keep(state, {"blocks.0.attn.qkv": 403})
    mha_model, _, mha = _built("multihead_attention")
    plan = mha.plan(mha_model.state_dict(), 0.6)  # int(4 * 0.4) = 1 of 4 heads of 4 channels
    assert plan.kept_counts == (4,)
    sub = _sub(mha_model, plan, mha_model.state_dict())
    assert (sub.mha.embed_dim, sub.mha.num_heads, sub.mha.head_dim) == (4, 1, 4)


def test_units_and_wiring_in_json():
    model, _, planner = _built("vit_tiny_patch16_224")
    plan = planner.plan(model.state_dict(), 0.3)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["layout"]["wiring"] == planner.layout.wiring and len(data["layout"]["units"]) == 12
    back = Plan.from_json(data)
    assert back == plan and back.layout.units == planner.layout.units
    planner.check(back)
    bad = json.loads(json.dumps(data))
    bad["layout"]["units"][0][2] = 7  # 576 channels are not 3 chunks of blocks of 7
    with pytest.raises(PayloadError, match=r"layout.units\[0\]"):
        Plan.from_json(bad)
    # a plan saved without the wiring (shapes-only fingerprint) is still accepted
    legacy = json.loads(json.dumps(data))
    del legacy["layout"]["wiring"]
    legacy["fingerprint"] = planner.layout.shapes_fingerprint
    old = Plan.from_json(legacy)
    planner.check(old)
    assert all(torch.equal(a, b) for a, b in zip(old.kept, plan.kept))


def test_half_precision_model_is_checked_in_float32():
    model = _LNMLP().half()
    planner = Planner.from_module(model, torch.randn(4, 6).half(), unprunable=("classifier",))
    assert planner.group_names == ["fc"] and planner.full_shapes["norm.weight"] == (8,)
    assert next(model.parameters()).dtype == torch.float16  # the model itself is untouched


class _Overflowing(_LNMLP):
    def forward(self, x):
        return super().forward(x) * float("inf")


def test_self_check_refuses_a_model_it_cannot_compare_and_can_be_turned_off():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelError, match="_Overflowing: the self-check cannot compare.*not finite.*self_check=False"):
        Planner.from_module(_Overflowing(), x, unprunable=("classifier",))
    planner = Planner.from_module(_Overflowing(), x, unprunable=("classifier",), self_check=False)
    assert planner.group_names == ["fc"]
    # unchecked, a channels-last flatten is planned (wrongly): the self-check is what refuses it
    flat = Planner.from_module(_FlattenCNN(channels_last=True), torch.zeros(1, 3, 6, 6), self_check=False, unprunable=("classifier",))
    assert flat.group_names == ["fc", "conv"]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "convnext_atto", "gru_2_layers"])
def test_nested_plans_compose_on_new_layers(name):
    model, x, planner = _built(name)
    state = model.state_dict()
    outer = planner.plan(state, 0.3)
    sub = _sub(model, outer, state)
    inner_planner = Planner.from_module(sub, x, unprunable=planner.unprunable_modules)
    assert inner_planner.group_names == planner.group_names
    assert inner_planner.group_sizes == list(outer.kept_counts)
    inner = inner_planner.plan(sub.state_dict(), 0.5)
    composed = outer.compose(inner)
    Plan(planner.layout, composed.kept)  # whole heads / equal counts: a valid plan of the full model
    twice, once = inner.extract(sub.state_dict()), composed.extract(state)
    assert all(torch.equal(twice[k], once[k]) for k in once)
    # the sparse model's scores are the sub-model's: nesting within the outer plan is the same plan
    within = planner.plan(outer.sparse(state), 0.5, within=outer)
    assert all(torch.equal(w, c) for w, c in zip(within.kept, composed.kept))


class _NormThenHeads(nn.Module):
    """GroupNorm groups (2 x 4 channels) and attention heads (2 x 4 channels) on one stream."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.classifier = nn.Linear(8, 2)

    def forward(self, x):
        h = self.norm(self.conv(x)).flatten(2).transpose(1, 2)
        return self.classifier(self.mha(h, h, h, need_weights=False)[0].mean(1))


def test_groups_needing_two_block_structures_are_refused():
    with pytest.raises(ModelError, match=r"layer 'mha' \(MultiheadAttention\): the channels of group 'conv'.*\(2, 1\) and \(1, 4\).*HINT: list 'conv'"):
        Planner.from_module(_NormThenHeads(), torch.zeros(1, 3, 4, 4), unprunable=("classifier",))
