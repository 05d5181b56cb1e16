"""Build pruning plans from a torch-pruning dependency graph.

:meth:`Planner.from_module` traces the model ONCE with torch-pruning's ``DependencyGraph``
(``nn.LSTM`` handled by :class:`~lightning_fedprune.core.lstm_pruning.LSTMPruner`, ``nn.GRU`` /
``nn.RNN`` traced as one op) and queries every
prunable group on the UNPRUNED model, so every index is in original coordinates. Each group's
``(dependency, indices)`` pairs are turned into per-tensor index maps (the
:class:`~lightning_fedprune.core.pruning.layout.Layout`); after that no module is needed: plans are
computed from state dicts and applied by plain tensor indexing.

The dependency graph is trusted only as far as the self-check confirms it: every group's
sub-model must compute what the sparse model computes (see :meth:`Planner.from_module`); a group
whose channels an operation maps in a way the graph does not capture (a channels-last flatten
before a Linear, a reshape into heads without ``num_heads`` / ``head_dim`` attributes) is refused
by name instead of yielding a wrong sub-model.

Attention: in a block written as timm's ``Attention`` (a ``qkv`` Linear, int ``num_heads`` and
``head_dim``) the qkv group keeps whole heads, the same in q, k and v, and ``proj`` the matching
inputs; ``nn.MultiheadAttention`` keeps whole heads of its embedding. Torch-pruning's default for
attention shrinks the head dimension instead, which changes the softmax scale wherever it is
derived from the head size (``scaled_dot_product_attention``'s default, ``nn.MultiheadAttention``):
such a sub-model is not the sparse model. Whole heads keep ``head_dim`` and therefore the scale.

FedMP's rule (Jiang et al., Sec. III-B) is :meth:`Planner.plan`: the same ratio in every group,
keeping the channels with the largest L1 norm of their filter / neuron weights::

    planner = Planner.from_module(model, example_input, unprunable=("classifier",))
    plan = planner.plan(global_state, ratio=0.5)
    sub_state = plan.extract(global_state)       # tensors of the physically smaller sub-model
    ...                                           # a client trains a model of plan.sub_shapes()
    new_full = plan.recover(trained_sub_state, base=global_state)   # R2SP
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_fedprune.core.lstm_pruning import LSTMPruner, check_lstm_supported, gate_rows
from lightning_fedprune.core.pruning.layout import DimMap, Layout, Part, fingerprint_of
from lightning_fedprune.core.pruning.plan import Plan, _check_kept
from lightning_fedprune.core.pruning.resize import RNN_GATES, is_head_attention, resize_module
from lightning_fedprune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

__all__ = ["Planner", "matches_unprunable"]

#: Module types whose output channels are filters / neurons (scored by importance).
_WRITER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.RNNBase)


class _RecurrentStandIn(tp.pruner.BasePruningFunc):
    """``nn.GRU`` / ``nn.RNN`` registered with the dependency graph as one op (torch-pruning has no
    pruner for them), so that it couples their hidden units with the layers reading them and their
    input features with the layers feeding them. Plans prune them by index maps (their gate rows,
    as for an LSTM's); these pruning functions are never called."""

    TARGET_MODULES = (nn.GRU, nn.RNN)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise ModelError(f"{type(layer).__name__} hidden units are pruned by plans (index maps), not in place")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise ModelError(f"{type(layer).__name__} input features are pruned by plans (index maps), not in place")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.hidden_size * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size


def matches_unprunable(name: str, patterns: Iterable[str]) -> bool:
    """True if module ``name`` matches a pattern ``p``: ``name == p``, ``name`` ends with
    ``"." + p`` (so ``"classifier"`` matches ``"model.classifier"``) or ``fnmatch(name, p)``."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class _Writer:
    """One output-filter tensor scored by importance: rows of ``key`` along ``dim``; entry ``i``
    of the group's channel ``root[i]`` sums the row scores of ``rows[i, :]``."""

    __slots__ = ("key", "dim", "rows", "root")

    def __init__(self, key: str, dim: int, rows: torch.Tensor, root: torch.Tensor) -> None:
        self.key, self.dim, self.rows, self.root = key, dim, rows, root


class Planner:
    """Makes :class:`~lightning_fedprune.core.pruning.plan.Plan` s for one architecture.

    Build it with :meth:`from_module`; it keeps no reference to the model.

    Attributes:
        layout: The architecture's groups and index maps.
        unprunable_modules: Module names matched by the ``unprunable`` patterns.
    """

    def __init__(self, layout: Layout, writers: Sequence[Sequence[_Writer]], *, unprunable_modules: Sequence[str] = ()) -> None:
        self.layout = layout
        self._writers = [list(w) for w in writers]
        self.unprunable_modules = tuple(unprunable_modules)
        self._full_plan: Plan | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls, model: nn.Module, example_input: Any, *, unprunable: Iterable[str] = (), self_check: bool = True
    ) -> "Planner":
        """Trace ``model`` once and derive its prunable groups and index maps, then check them.

        The self-check (``self_check=True``) makes plans at a few ratios for a copy of the model with
        random 1-d tensors (biases, norm parameters, BN statistics) and compares, in eval mode on
        ``example_input``, the sub-model's forward with the sparse model's (:meth:`Plan.sparse`).
        Where a ``LayerNorm`` / ``GroupNorm`` normalizes pruned channels the sparse model's
        statistics cover every channel and the sub-model's only the kept ones, so there the sparse
        model is run with those norms computing their statistics over the kept channels (the
        sub-model's definition). A group whose pruning makes the outputs differ (relative error
        above 1e-4, in float32 whatever the model's dtype) or the sub-model fail is refused with a
        :class:`ModelError` naming its layers and the cause. It costs a float32 copy of the model
        and about two forwards per ratio (more only to name a failing group): measured 0.1-0.6 s
        for the timm and torchvision CNNs of the tests at 64x64, one thread.

        The model's train/eval mode (of every submodule) is restored afterwards and its weights are
        not changed. ``model`` may be a bare network or a LightningModule whose forward calls its
        network (keys are then e.g. ``"model.features.0.weight"``).

        Args:
            model: The full (unpruned) model. (Models with LSTMs in another dtype are traced as a
                float32 copy: torch-pruning sees an LSTM as one fused op only in float32.)
            example_input: An input batch for one forward (tensor, tuple of tensors or dict).
            unprunable: Module name patterns whose OUTPUT channels are never pruned (their inputs
                may be); see :func:`matches_unprunable`. Submodules of a match are unprunable too.
            self_check: Check every group's sub-model against the sparse model (see above).

        Raises:
            ModelError: If the model cannot be traced (naming the layer being run), contains a
                coupled layer the plans cannot handle (naming it), fails the self-check (naming the
                group's layers and the cause) or is a ``torch.compile`` wrapper.
        """
        if not isinstance(model, nn.Module):
            raise ModelError(f"Planner.from_module expects an nn.Module, got {type(model).__name__}")
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            raise ModelError(
                "Planner.from_module got a torch.compile'd module; its graph has no prunable groups. "
                "HINT: pass the original module (`compiled._orig_mod`)."
            )
        if isinstance(unprunable, str):
            unprunable = (unprunable,)
        patterns = tuple(unprunable)
        named = dict(model.named_modules())
        matched = [n for n in named if n and matches_unprunable(n, patterns)]
        ignored: list[nn.Module] = []
        for n in matched:
            ignored.extend(named[n].modules())
        ignored_ids = {id(m) for m in ignored}
        if patterns and not matched:
            log.debug("unprunable patterns %s match no module of %s", patterns, type(model).__name__)

        lstm_types = {type(m) for m in model.modules() if isinstance(m, nn.LSTM)}
        for n, m in named.items():
            if isinstance(m, nn.RNNBase) and id(m) not in ignored_ids:
                check_lstm_supported(m, n)
        pruner = LSTMPruner()
        customized: dict[type, tp.pruner.BasePruningFunc] = {t: pruner for t in lstm_types}
        stand_in = _RecurrentStandIn()
        for m in model.modules():
            if isinstance(m, nn.RNNBase) and not isinstance(m, nn.LSTM):
                customized[type(m)] = stand_in

        traced, traced_example = model, example_input
        if any(
            p.dtype != torch.float32
            for n, m in named.items()
            if isinstance(m, nn.LSTM) and id(m) not in ignored_ids
            for p in m.parameters()
        ):
            # torch-pruning sees an LSTM as one fused op only in float32 (float64 decomposes it)
            traced = copy.deepcopy(model).float()
            traced_example = _float32(example_input)
            named = dict(traced.named_modules())
            ignored = [m for n in matched for m in named[n].modules()]
        modes = [(m, m.training) for m in model.modules()]
        with _without_metrics(traced), _recurrent_stand_in(traced):
            graph, groups = _trace(traced, traced_example, customized, ignored, named)
        try:
            planner = _build(cls, traced, graph, groups, named, matched)
        finally:
            for m, training in modes:
                m.training = training
        if self_check:
            _self_check(planner, model, example_input)
        return planner

    # ------------------------------------------------------------------ description
    @property
    def fingerprint(self) -> str:
        """Stable hash of ``(key, shape)`` of every parameter and buffer of the full model and of
        the traced graph's wiring (see :class:`~lightning_fedprune.core.pruning.layout.Layout`)."""
        return self.layout.fingerprint

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @property
    def group_names(self) -> list[str]:
        """A readable name per group: the root layer's module name (``<lstm>.l<k>`` for LSTM layers)."""
        return list(self.layout.group_names)

    @property
    def group_sizes(self) -> list[int]:
        return list(self.layout.group_sizes)

    @property
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.layout.shapes)

    @property
    def group_writers(self) -> list[tuple[str, ...]]:
        """Per group, the keys of the tensors whose output filters :meth:`importance` scores
        (several for residual streams)."""
        return [tuple(dict.fromkeys(w.key for w in ws)) for ws in self._writers]

    def full_plan(self) -> Plan:
        """The plan that keeps every channel."""
        if self._full_plan is None:
            kept = tuple(torch.arange(s) for s in self.layout.group_sizes)
            self._full_plan = Plan._trusted(self.layout, kept, 0.0)
        return self._full_plan

    def check(self, plan: Plan) -> None:
        """Raise :class:`ConfigError` unless ``plan`` was made for this architecture."""
        if not isinstance(plan, Plan):
            raise ConfigError(f"expected a Plan, got {type(plan).__name__}")
        ours, theirs = self.layout, plan.layout
        if plan.fingerprint != self.fingerprint and not (
            not theirs.wiring and theirs.fingerprint == ours.shapes_fingerprint  # saved without wiring
        ):
            if theirs.shapes_fingerprint == ours.shapes_fingerprint:
                raise ConfigError(
                    f"plan fingerprint {plan.fingerprint} does not match this model's fingerprint {self.fingerprint}: "
                    "the plan was made for a model with the same tensors but other wiring (its layers connect "
                    "differently, e.g. the inputs of a torch.cat in another order)"
                )
            raise ConfigError(
                f"plan fingerprint {plan.fingerprint} does not match this model's fingerprint "
                f"{self.fingerprint}: the plan was made for another architecture"
            )
        if not plan.layout.same_structure(self.layout):
            raise ConfigError(
                f"plan (fingerprint {plan.fingerprint}) has other prunable groups than this planner: "
                "it was made with other unprunable layers"
            )

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def importance(self, state: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """FedMP's L1 importance of every channel of every group, from ``state``.

        A channel's score is the sum of ``|w|`` over its output filter (conv), neuron row (linear)
        or the gate rows of ``weight_ih`` and ``weight_hh`` (four for an LSTM hidden unit, three
        for a GRU's, one for an RNN's). Channels written
        by several layers (residual streams) score the SUM over all writer layers.

        Args:
            state: Full-model tensors (e.g. the server's global state); only the writers' weights
                are read.

        Returns:
            Per group, a float32 CPU tensor of one score per channel.

        Raises:
            ConfigError: If a needed tensor is missing or has the wrong shape.
        """
        scores = []
        for size, writers in zip(self.layout.group_sizes, self._writers):
            s = torch.zeros(size, dtype=torch.float32)
            for w in writers:
                t = state.get(w.key)
                if t is None:
                    raise ConfigError(f"importance: state lacks tensor {w.key!r}")
                if tuple(t.shape) != self.layout.shapes[w.key]:
                    raise ConfigError(
                        f"importance: tensor {w.key!r} has shape {tuple(t.shape)}, the full model has "
                        f"{self.layout.shapes[w.key]}"
                    )
                t = t.detach().float()
                if w.dim != 0:
                    t = t.transpose(0, w.dim)
                rows = t.abs().flatten(1).sum(1).cpu()
                per = rows[w.rows[:, 0]] if w.rows.shape[1] == 1 else rows[w.rows].sum(1)
                s.index_add_(0, w.root, per)
            scores.append(s)
        return scores

    # ------------------------------------------------------------------ plans
    def plan(
        self,
        state: Mapping[str, torch.Tensor] | None,
        ratio: float,
        *,
        within: Plan | None = None,
        scores: Sequence[torch.Tensor] | None = None,
    ) -> Plan:
        """FedMP's plan: the same ``ratio`` in every group.

        Each group keeps ``int(C * (1 - ratio))`` (at least 1) of its ``C`` channels, those with the
        highest :meth:`importance` (ties: lower index first), sorted ascending in original
        coordinates. With ``within``, only ``within``'s kept channels are candidates and
        ``int(C_within * (1 - ratio))`` are kept: a plan nested in ``within``.

        Args:
            state: Full-model tensors to score (may be ``None`` when ``scores`` is given).
            ratio: Pruning ratio in ``[0, 1)``.
            within: Choose only among this plan's kept channels.
            scores: Precomputed :meth:`importance` of ``state`` (many plans of one global model,
                e.g. one per client, score it once).

        Raises:
            ConfigError: If ``ratio`` is not a number in ``[0, 1)``, ``within`` is for another
                model or ``scores`` do not fit the groups.
        """
        ratio = _check_ratio(ratio)
        candidates = self._candidates(within)
        keep = []
        for g, c in enumerate(candidates):
            chunks, unit = self.layout.group_units(g)
            block = chunks * unit  # channels per kept block (1 for most groups)
            keep.append(max(1, int(c.numel() // block * (1 - ratio))) * block)
        return Plan._trusted(self.layout, self._select(state, candidates, keep, scores), ratio)

    def plan_from_keep(
        self,
        state: Mapping[str, torch.Tensor] | None,
        keep: Mapping[str | int, int] | Sequence[int],
        *,
        within: Plan | None = None,
        scores: Sequence[torch.Tensor] | None = None,
    ) -> Plan:
        """A plan keeping absolute numbers of channels per group (highest importance first).

        Args:
            state: Full-model tensors for :meth:`importance`.
            keep: Per group (by name or index) the number of channels to keep; a mapping may leave
                groups out (they keep all candidates); a sequence needs one count per group.
            within: Choose only among this plan's kept channels.
            scores: Precomputed :meth:`importance` (then ``state`` may be ``None``).

        Raises:
            ConfigError: On unknown groups, counts outside ``[1, candidates]`` or unequal counts for
                the layers of one LSTM / GRU / RNN.
        """
        candidates = self._candidates(within)
        counts = [c.numel() for c in candidates]
        if isinstance(keep, Mapping):
            for key, k in keep.items():
                counts[self._group(key)] = k
        elif isinstance(keep, Sequence) and not isinstance(keep, str):
            if len(keep) != self.num_groups:
                raise ConfigError(f"keep needs one count per group ({self.num_groups}), got {len(keep)}")
            counts = list(keep)
        else:
            raise ConfigError(f"keep must be a mapping or a sequence of counts, got {type(keep).__name__}")
        for g, (k, c) in enumerate(zip(counts, candidates)):
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= c.numel():
                raise ConfigError(
                    f"keep count of group {self.layout.group_names[g]!r} must be an int in [1, {c.numel()}], got {k!r}"
                )
            chunks, unit = self.layout.group_units(g)
            if k % (chunks * unit):
                raise ConfigError(
                    f"keep count of group {self.layout.group_names[g]!r} must be a multiple of {chunks * unit}: the "
                    f"group keeps {self.layout.describe_units(g)}; got {k}"
                )
        for tie in self.layout.ties:
            if len({counts[g] for g in tie}) > 1:
                names = [self.layout.group_names[g] for g in tie]
                raise ConfigError(
                    f"groups {names} (layers of one nn.LSTM / nn.GRU / nn.RNN) need equal keep counts, "
                    f"got {[counts[g] for g in tie]}"
                )
        return Plan._trusted(self.layout, self._select(state, candidates, counts, scores), None)

    def plan_from_indices(self, kept: Sequence[Sequence[int]] | Mapping[str | int, Sequence[int]]) -> Plan:
        """A plan from explicit kept channel indices per group (original coordinates).

        Args:
            kept: One index list per group, or a mapping from group name / index to indices (groups
                left out keep every channel). Indices must be sorted, unique, in range, non-empty.

        Raises:
            ConfigError: On invalid indices or unknown groups.
        """
        if isinstance(kept, Mapping):
            full = [torch.arange(s) for s in self.layout.group_sizes]
            for key, idx in kept.items():
                full[self._group(key)] = idx
            kept_list: Sequence[Any] = full
        else:
            kept_list = kept
        return Plan._trusted(self.layout, _check_kept(self.layout, list(kept_list), ConfigError), None)

    # ------------------------------------------------------------------ internals
    def _group(self, key: str | int) -> int:
        try:
            return self.layout.group_index(key)
        except KeyError:
            raise ConfigError(
                f"unknown group {key!r}; groups: {list(self.layout.group_names)[:12]}"
                + (" ..." if self.num_groups > 12 else "")
            ) from None

    def _candidates(self, within: Plan | None) -> list[torch.Tensor]:
        if within is None:
            return [torch.arange(s) for s in self.layout.group_sizes]
        self.check(within)
        return list(within.kept)

    def _select(
        self,
        state: Mapping[str, torch.Tensor] | None,
        candidates: Sequence[torch.Tensor],
        keep: Sequence[int],
        scores: Sequence[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...]:
        if scores is None:
            if state is None:
                raise ConfigError("give the state to score or precomputed `scores`")
            scores = self.importance(state)
        elif len(scores) != self.num_groups or any(
            tuple(s.shape) != (size,) for s, size in zip(scores, self.layout.group_sizes)
        ):
            raise ConfigError(
                f"`scores` must hold one score per channel of each of the {self.num_groups} groups "
                f"(sizes {list(self.layout.group_sizes)[:8]}...)"
            )
        kept = []
        for g, (s, cand, k) in enumerate(zip(scores, candidates, keep)):
            if k >= cand.numel():
                kept.append(cand.clone())
                continue
            chunks, unit = self.layout.group_units(g)
            if (chunks, unit) != (1, 1):  # score whole blocks: the sum over their channels in every chunk
                blocks = self.layout.blocks_of(g, cand)
                sc = s.view(chunks, -1, unit).sum((0, 2))[blocks]
                sc = torch.nan_to_num(sc, nan=-math.inf)
                order = torch.sort(sc, descending=True, stable=True).indices[: k // (chunks * unit)]
                kept.append(self.layout.expand_units(g, torch.sort(blocks[order]).values))
                continue
            sc = torch.nan_to_num(s[cand], nan=-math.inf)
            order = torch.sort(sc, descending=True, stable=True).indices[:k]
            kept.append(torch.sort(cand[order]).values)
        return tuple(kept)


def _float32(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example.float() if example.is_floating_point() else example
    if isinstance(example, (tuple, list)):
        return type(example)(_float32(e) for e in example)
    if isinstance(example, Mapping):
        return {k: _float32(v) for k, v in example.items()}
    return example


def _forward(model: nn.Module, example: Any) -> Any:
    """One forward: a tuple/list is positional inputs, a dict keyword inputs, anything else one input."""
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    return model(example)


def _check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"`ratio` must be a number in [0, 1), got {ratio!r}")
    return float(ratio)


# --------------------------------------------------------------------------------------------------
# tracing
# --------------------------------------------------------------------------------------------------
def _trace(
    model: nn.Module,
    example_input: Any,
    customized: dict[type, tp.pruner.BasePruningFunc],
    ignored: list[nn.Module],
    named: dict[str, nn.Module],
) -> tuple[tp.DependencyGraph, list[Any]]:
    """Build the dependency graph and query every group; ``ModelError`` names the failing layer."""
    name_of = {id(m): n for n, m in named.items()}
    stack: list[str] = []

    def pre(module: nn.Module, _args: Any) -> None:
        stack.append(name_of.get(id(module), type(module).__name__))

    def post(module: nn.Module, _args: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    graph = tp.DependencyGraph()
    phase = "forward"
    try:
        with torch.enable_grad():
            graph.build_dependency(
                model, example_inputs=example_input, forward_fn=_forward, customized_pruners=customized, verbose=False
            )
        stack.clear()
        phase = "groups"
        groups = list(
            graph.get_all_groups(
                ignored_layers=ignored, root_module_types=(tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, nn.RNNBase)
            )
        )
    except ModelError:
        raise
    except Exception as exc:  # torch-pruning raises plain exceptions (AssertionError, RuntimeError, ...)
        what = f"{type(exc).__name__}: {exc}"
        if stack:  # the forward itself failed inside a layer
            raise ModelError(
                f"cannot trace {type(model).__name__} with torch-pruning in layer {stack[-1]!r}: {what}"
            ) from exc
        layers = _layers_near(_failing_node(exc), name_of)
        near = f" after layer(s) {layers}" if layers else ""
        if phase == "forward":  # mapping channels through the traced graph (every layer is traced)
            raise ModelError(
                f"cannot trace {type(model).__name__} with torch-pruning: it cannot map channels through an "
                f"operation{near} ({what}). Listing layers as unprunable does not avoid this: every operation is "
                "traced. HINT: write the operation with layers torch-pruning maps (e.g. a channel shuffle as an "
                "explicit index_select) or prune this model with masks instead of plans."
            ) from exc
        hint = f"list {layers[0]!r} as unprunable" if layers else "list the layers around it as unprunable"
        raise ModelError(
            f"cannot trace {type(model).__name__} with torch-pruning: grouping the channels{near} fails "
            f"({what}). HINT: {hint}."
        ) from exc
    finally:
        for h in handles:
            h.remove()
    return graph, groups


def _failing_node(exc: BaseException) -> Any:
    """The innermost torch-pruning graph node among the locals of ``exc``'s traceback, if any."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, tp.dependency.Node):
                found = value
        tb = tb.tb_next
    return found


def _layers_near(node: Any, name_of: Mapping[int, str], limit: int = 3, types: tuple[type, ...] = ()) -> list[str]:
    """Names of the closest named layers (of ``types``, if given) at or upstream of graph ``node``
    (breadth first)."""
    if node is None:
        return []
    out: list[str] = []
    seen = {id(node)}
    frontier = [node]
    while frontier and len(out) < limit:
        nxt = []
        for n in frontier:
            name = name_of.get(id(n.module))
            if name and (not types or isinstance(n.module, types)):
                out.append(name)
                continue
            for i in n.inputs:
                if id(i) not in seen:
                    seen.add(id(i))
                    nxt.append(i)
        frontier = nxt
    return out[:limit]


# --------------------------------------------------------------------------------------------------
# from groups to the layout
# --------------------------------------------------------------------------------------------------
class _Builder:
    """Accumulates, per (key, dim), each group's (target position, channel) pairs."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.pairs: dict[tuple[str, int], dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}
        self.owner: dict[tuple[str, int], str] = {}

    def add(
        self, key: str, dim: int, group: int, tgt: torch.Tensor, root: torch.Tensor, layer: str, group_root: str
    ) -> None:
        if key not in self.shapes:
            return  # e.g. a non-persistent buffer: not part of any state dict
        size = self.shapes[key][dim]
        if tgt.numel() and (int(tgt.min()) < 0 or int(tgt.max()) >= size):
            raise ModelError(
                f"layer {layer!r}: torch-pruning couples positions up to {int(tgt.max())} of {key!r} (dim {dim}), "
                f"which has only {size}: an operation between layers changes the number of channels but was "
                "traced as element-wise (e.g. F.pad on channels). HINT: use a layer torch-pruning understands "
                f"(a 1x1 conv projection) or list {group_root!r} (whose output channels reach it) as unprunable."
            )
        bucket = self.pairs.setdefault((key, dim), {})
        t_list, r_list = bucket.setdefault(group, ([], []))
        t_list.append(tgt)
        r_list.append(root)
        self.owner.setdefault((key, dim), layer)


def _build(
    cls: type[Planner],
    model: nn.Module,
    graph: tp.DependencyGraph,
    groups: list[Any],
    named: dict[str, nn.Module],
    unprunable_names: Sequence[str],
) -> Planner:
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # every name a module is reachable under (shared modules have several)
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    param_name = {p: n for p, n in getattr(graph, "_param_to_name", {}).items()}

    builder = _Builder(shapes)
    group_units: list[tuple[int, int]] = []
    # timm-style attention blocks by their qkv Linear
    attention_of = {id(m.qkv): m for m in model.modules() if is_head_attention(m)}
    group_names: list[str] = []
    group_sizes: list[int] = []
    writers: list[list[_Writer]] = []
    ties: list[tuple[int, ...]] = []
    lstm_out_group: dict[int, int] = {}  # id(lstm) -> graph group index

    def key_of(prefix: str, attr: str) -> str:
        return f"{prefix}.{attr}" if prefix else attr

    name_of = {i: ns[0] for i, ns in names_of.items()}

    def feeders(module: nn.Module) -> list[str]:
        """The closest layers upstream of ``module`` whose output channels reach its inputs."""
        node = graph.module2node.get(module)
        out: list[str] = []
        for i in node.inputs if node is not None else ():
            out.extend(n for n in _layers_near(i, name_of, types=_WRITER_TYPES) if n not in out)
        return out

    _check_grouped_convolutions(graph, named, unprunable_names, name_of, feeders)

    for group in groups:
        gi = len(group_sizes)
        root_dep = group[0].dep
        root_module = root_dep.target.module
        root_name = root_layer = names_of[id(root_module)][0]
        size = graph.get_out_channels(root_module)
        if isinstance(root_module, nn.RNNBase):
            root_name = f"{root_name}.l{root_module.num_layers - 1}"
        group_names.append(root_name)
        group_sizes.append(int(size))
        group_units.append(_units_of_root(root_module, int(size), attention_of))
        gw: list[_Writer] = []
        seen_mha: set[int] = set()
        for item in group:
            dep = item.dep
            module = dep.target.module
            tgt = torch.as_tensor(list(item.idxs), dtype=torch.long)
            root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
            if isinstance(module, nn.MultiheadAttention):
                # torch-pruning prunes its embedding with one function for inputs and outputs
                if id(module) in seen_mha:
                    continue
                seen_mha.add(id(module))
                units = (1, module.head_dim)
                group_units[gi] = _require_units(group_units[gi], units, module, tgt, root, names_of, root_layer)
            if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
                units = (module.num_groups, 1)
                group_units[gi] = _require_units(group_units[gi], units, module, tgt, root, names_of, root_layer)
            if tgt.numel() != torch.unique(tgt).numel():
                raise ModelError(f"torch-pruning maps a channel twice in group {root_name!r}: unsupported coupling")
            if isinstance(module, nn.Parameter):
                pname = param_name.get(module)
                if pname is None:
                    raise ModelError(f"group {root_name!r} couples an unnamed parameter of shape {tuple(module.shape)}")
                dim = dep.target.pruning_dim % module.dim()
                builder.add(pname, dim, gi, tgt, root, pname, root_layer)
                continue
            if id(module) not in names_of:
                continue  # torch-pruning's pseudo ops (element-wise, reshape, concat, output, ...)
            prefixes = names_of[id(module)]
            layer = prefixes[0]
            is_out = graph.is_out_channel_pruning_fn(dep.handler)
            for prefix in prefixes:
                entries, writer_entries = _tensor_dims(module, is_out, layer, tgt, root, feeders)
                for attr, dim, t, r in entries:
                    builder.add(key_of(prefix, attr), dim, gi, t, r, layer, root_layer)
                if prefix is prefixes[0]:
                    for attr, dim, rows, r in writer_entries:
                        key = key_of(prefix, attr)
                        if key in shapes:
                            gw.append(_Writer(key, dim, rows, r))
            if is_out and isinstance(module, _WRITER_TYPES):
                # a writer must hand ALL its output channels to this group
                full = graph.get_out_channels(module)
                if tgt.numel() != full:
                    raise ModelError(
                        f"layer {layer!r}: torch-pruning couples only {tgt.numel()} of its {full} output channels "
                        f"with group {root_name!r}; an operation between layers was probably traced as "
                        "element-wise (e.g. F.pad on channels). HINT: use a layer torch-pruning understands "
                        f"(a 1x1 conv projection) or list {root_layer!r} as unprunable."
                    )
            if is_out and isinstance(module, nn.RNNBase):
                lstm_out_group[id(module)] = gi
        if not gw:
            raise ModelError(f"group {root_name!r} has no layer whose output filters could be scored")
        writers.append(gw)

    # inner layers of multi-layer LSTMs (GRUs, RNNs): one group per layer, tied to the last layer's group
    order: list[int] = []
    for gi in range(len(group_sizes)):
        for n_lstm, lstm in named.items():
            if isinstance(lstm, nn.RNNBase) and lstm_out_group.get(id(lstm)) == gi and lstm.num_layers > 1:
                tie = []
                hidden = lstm.hidden_size
                for k in range(lstm.num_layers - 1):
                    new = len(group_sizes)
                    group_names.append(f"{n_lstm}.l{k}")
                    group_sizes.append(hidden)
                    group_units.append((1, 1))
                    units = torch.arange(hidden)
                    gw = []
                    for prefix in names_of[id(lstm)]:
                        for attr, dim, t, r in _lstm_layer_entries(lstm, k, units, units):
                            builder.add(key_of(prefix, attr), dim, new, t, r, n_lstm, n_lstm)
                    for attr in (f"weight_ih_l{k}", f"weight_hh_l{k}"):
                        table = _gate_row_table(units, hidden, RNN_GATES[lstm.mode])
                        gw.append(_Writer(key_of(n_lstm, attr), 0, table, units))
                    writers.append(gw)
                    order.append(new)
                    tie.append(new)
                ties.append((*tie, gi))
        order.append(gi)

    # index maps per (key, dim), deduplicated
    maps: list[DimMap] = []
    map_ids: dict[tuple, int] = {}
    dims: dict[str, list[int | None]] = {k: [None] * len(s) for k, s in shapes.items()}
    position = {g: i for i, g in enumerate(order)}
    for (key, dim), bucket in builder.pairs.items():
        size = shapes[key][dim]
        parts = []
        covered = torch.zeros(size, dtype=torch.bool)
        for g, (t_list, r_list) in sorted(bucket.items()):
            tgt, root = torch.cat(t_list), torch.cat(r_list)
            if torch.unique(tgt).numel() != tgt.numel() or bool(covered[tgt].any()):
                raise ModelError(
                    f"layer {builder.owner[(key, dim)]!r}: positions of {key!r} (dim {dim}) are claimed twice by the "
                    "dependency graph; unsupported coupling"
                )
            covered[tgt] = True
            parts.append(Part.from_pairs(position[g], tgt, root, group_sizes[g]))
        signature = (size, tuple((p.group, p.regular if p.regular else (tuple(p.tgt.tolist()), tuple(p.root.tolist()))) for p in parts))
        mi = map_ids.get(signature)
        if mi is None:
            mi = len(maps)
            maps.append(DimMap.build(size, parts))
            map_ids[signature] = mi
        dims[key][dim] = mi

    # tied tensors (one Parameter under several keys) must be pruned identically
    by_tensor: dict[int, list[str]] = {}
    for k, v in state.items():
        by_tensor.setdefault(id(v), []).append(k)
    for keys in by_tensor.values():
        if len({tuple(dims[k]) for k in keys}) > 1:
            raise ModelError(
                f"tensors {keys} are one shared (tied) tensor but would be pruned differently. "
                "HINT: list the layers sharing it as unprunable."
            )

    names = [group_names[g] for g in order]
    sizes = [group_sizes[g] for g in order]
    wiring = _wiring_of(graph, name_of)
    layout = Layout(
        fingerprint=fingerprint_of(shapes, wiring),
        group_names=tuple(names),
        group_sizes=tuple(sizes),
        shapes=shapes,
        maps=tuple(maps),
        dims={k: tuple(v) for k, v in dims.items()},
        ties=tuple(tuple(position[g] for g in t) for t in ties),
        wiring=wiring,
        units=tuple(group_units[g] for g in order) if any(u != (1, 1) for u in group_units) else (),
    )
    if len(set(names)) != len(names):
        raise ModelError(f"duplicate group names {names}: a module is reached under several names")
    return cls(layout, [writers[g] for g in order], unprunable_modules=unprunable_names)


def _is_grouped(module: Any) -> bool:
    """A grouped convolution that is not depthwise."""
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups > 1
        and not module.groups == module.in_channels == module.out_channels
    )


def _check_grouped_convolutions(
    graph: tp.DependencyGraph,
    named: Mapping[str, nn.Module],
    unprunable: Sequence[str],
    name_of: Mapping[int, str],
    feeders: Any,
) -> None:
    """Refuse grouped (not depthwise) convolutions whose output channels or inputs would be pruned,
    naming every layer to list as unprunable at once."""
    ignored = {id(m) for n in unprunable for m in named[n].modules()}
    grouped = [name_of[id(m)] for m in graph.module2node if _is_grouped(m) and id(m) in name_of]
    needed: list[str] = []
    for name in grouped:
        for n in [name, *feeders(named[name])]:
            if id(named[n]) not in ignored and n not in needed:
                needed.append(n)
    if needed:
        raise ModelError(
            f"layer {grouped[0]!r} is a grouped convolution (groups={named[grouped[0]].groups}); structured plans "
            "support groups=1 and depthwise convolutions only: neither the output channels of a grouped convolution "
            f"nor those of the layers feeding it can be pruned ({len(grouped)} grouped convolution(s)). HINT: list "
            f"{', '.join(repr(n) for n in needed)} as unprunable."
        )


def _require_units(
    current: tuple[int, int],
    units: tuple[int, int],
    module: nn.Module,
    tgt: torch.Tensor,
    root: torch.Tensor,
    names_of: Mapping[int, list[str]],
    root_layer: str,
) -> tuple[int, int]:
    """The group's blocks once ``module`` (attention heads, GroupNorm groups) asks for ``units``:
    its channels must be the group's channels one to one, and one block structure must fit all."""
    layer = names_of[id(module)][0]
    if not torch.equal(tgt, root):
        raise ModelError(
            f"layer {layer!r} ({type(module).__name__}) reads the channels of group {root_layer!r} through an offset "
            f"(e.g. a concatenation), so its {'heads' if units[0] == 1 else 'groups'} cannot be kept whole. "
            f"HINT: list {root_layer!r} as unprunable."
        )
    if current not in ((1, 1), units):
        raise ModelError(
            f"layer {layer!r} ({type(module).__name__}): the channels of group {root_layer!r} would have to be kept in "
            f"blocks {current} and {units} (chunks, block size) at once. HINT: list {root_layer!r} as unprunable."
        )
    return units


def _units_of_root(root: nn.Module, size: int, attention_of: Mapping[int, nn.Module]) -> tuple[int, int]:
    """``(chunks, unit)`` of a group rooted at ``root``: whole heads, the same in q, k and v, for the
    ``qkv`` Linear of a timm-style attention block; free channels otherwise."""
    attn = attention_of.get(id(root))
    if attn is not None and size == 3 * attn.num_heads * attn.head_dim:
        return (3, attn.head_dim)
    return (1, 1)


def _wiring_of(graph: tp.DependencyGraph, name_of: Mapping[int, str]) -> str:
    """Hash of the traced graph's wiring.

    Every node (a layer by name and type, a parameter by name, an operation by its kind and autograd
    function) gets a signature from its own label and its inputs' signatures in argument order, so
    the signature says what the node computes from the model's input and which layers it reads in
    which order; the hash covers every node's signature. It does not depend on the unprunable
    layers, on the order torch-pruning numbers its operations, nor on shapes except where an
    operation records them."""
    param_name = getattr(graph, "_param_to_name", {})

    def label(node: Any) -> str:
        m = node.module
        if isinstance(m, nn.Parameter):
            return "parameter:" + str(param_name.get(m, "?"))
        name = name_of.get(id(m))
        if name is not None:
            return f"layer:{name}:{type(m).__name__}"
        offsets = getattr(m, "offsets", None)
        return f"{type(m).__name__}:{type(node.grad_fn).__name__}:{offsets}"

    signature: dict[int, str] = {}
    visiting: set[int] = set()
    for start in graph.module2node.values():
        stack = [(start, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in signature:
                continue
            if ready:
                text = label(node) + "(" + ",".join(signature.get(id(i), "cycle") for i in node.inputs) + ")"
                signature[id(node)] = hashlib.sha256(text.encode()).hexdigest()
            elif id(node) not in visiting:
                visiting.add(id(node))
                stack.append((node, True))
                stack.extend((i, False) for i in node.inputs if id(i) not in signature)
    return hashlib.sha256("\n".join(sorted(signature.values())).encode()).hexdigest()[:16]


def _gate_row_table(units: torch.Tensor, hidden: int, gates: int) -> torch.Tensor:
    """(n, gates) rows of each unit's gates."""
    return gate_rows(units, hidden, gates).view(gates, -1).t().contiguous()


def _lstm_layer_entries(
    lstm: nn.RNNBase, k: int, tgt: torch.Tensor, root: torch.Tensor
) -> list[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """Tensor dims owned by hidden units ``tgt`` of layer ``k`` of an LSTM / GRU / RNN (pairs with
    group channels ``root``)."""
    hidden = getattr(lstm, f"weight_hh_l{k}").shape[1]
    gates = RNN_GATES[lstm.mode]
    rows, rows_root = gate_rows(tgt, hidden, gates), root.repeat(gates)
    out = [
        (f"weight_ih_l{k}", 0, rows, rows_root),
        (f"weight_hh_l{k}", 0, rows, rows_root),
        (f"weight_hh_l{k}", 1, tgt, root),
    ]
    if lstm.bias:
        out += [(f"bias_ih_l{k}", 0, rows, rows_root), (f"bias_hh_l{k}", 0, rows, rows_root)]
    if k + 1 < lstm.num_layers:
        out.append((f"weight_ih_l{k + 1}", 1, tgt, root))
    return out


def _tensor_dims(
    module: nn.Module, is_out: bool, layer: str, tgt: torch.Tensor, root: torch.Tensor, feeders: Any
) -> tuple[list[tuple[str, int, torch.Tensor, torch.Tensor]], list[tuple[str, int, torch.Tensor, torch.Tensor]]]:
    """The (attribute, dim, positions, channels) entries a dependency prunes, and the writer rows.

    Raises:
        ModelError: For module types the plans cannot handle.
    """
    entries: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []
    writer: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []

    def add(attr: str, dim: int) -> None:
        if getattr(module, attr, None) is not None:
            entries.append((attr, dim, tgt, root))

    rows1 = tgt[:, None]
    if isinstance(module, nn.modules.conv._ConvNd):
        if _is_grouped(module):  # refused before (_check_grouped_convolutions)
            raise ModelError(f"layer {layer!r} is a grouped convolution (groups={module.groups})")
        depthwise = module.groups > 1
        out_dim, in_dim = (1, 0) if module.transposed else (0, 1)
        if depthwise:
            add("weight", 0)
            add("bias", 0)
            writer.append(("weight", 0, rows1, root))
        elif is_out:
            add("weight", out_dim)
            add("bias", 0)
            writer.append(("weight", out_dim, rows1, root))
        else:
            add("weight", in_dim)
    elif isinstance(module, nn.Linear):
        if is_out:
            add("weight", 0)
            add("bias", 0)
            writer.append(("weight", 0, rows1, root))
        else:
            add("weight", 1)
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        for attr in ("weight", "bias", "running_mean", "running_var"):
            add(attr, 0)
    elif isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim or module.bias_k is not None:
            raise ModelError(
                f"layer {layer!r}: MultiheadAttention with kdim / vdim != embed_dim or add_bias_kv is not supported. "
                f"HINT: list {' and '.join(repr(n) for n in feeders(module) or [layer])} as unprunable."
            )
        embed = module.embed_dim
        rows = torch.cat([tgt + s * embed for s in range(3)])
        rows_root = root.repeat(3)
        entries.append(("in_proj_weight", 0, rows, rows_root))
        entries.append(("in_proj_weight", 1, tgt, root))
        if module.in_proj_bias is not None:
            entries.append(("in_proj_bias", 0, rows, rows_root))
        entries.append(("out_proj.weight", 0, tgt, root))
        entries.append(("out_proj.weight", 1, tgt, root))
        if module.out_proj.bias is not None:
            entries.append(("out_proj.bias", 0, tgt, root))
        writer.append(("out_proj.weight", 0, rows1, root))
    elif isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1 or not module.elementwise_affine:
            raise ModelError(
                f"layer {layer!r} is a LayerNorm over {tuple(module.normalized_shape)}"
                f"{'' if module.elementwise_affine else ' without affine parameters'}; plans prune LayerNorms over "
                f"one dimension with weights. HINT: list {' and '.join(repr(n) for n in feeders(module) or [layer])} "
                "as unprunable."
            )
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if p is not None:
                entries.append((attr, p.dim() - 1, tgt, root))
    elif isinstance(module, nn.GroupNorm):
        if not module.affine:
            raise ModelError(
                f"layer {layer!r} is a GroupNorm without affine parameters; plans prune GroupNorms with weights. "
                f"HINT: list {' and '.join(repr(n) for n in feeders(module) or [layer])} as unprunable."
            )
        add("weight", 0)
        add("bias", 0)
    elif isinstance(module, nn.PReLU):
        if module.num_parameters > 1:
            add("weight", 0)
    elif isinstance(module, nn.Embedding):
        add("weight", 1)
        writer.append(("weight", 1, rows1, root))
    elif isinstance(module, nn.RNNBase):
        check_lstm_supported(module, layer)
        if is_out:
            last = module.num_layers - 1
            entries.extend(_lstm_layer_entries(module, last, tgt, root))
            hidden = getattr(module, f"weight_hh_l{last}").shape[1]
            table = _gate_row_table(tgt, hidden, RNN_GATES[module.mode])
            writer.append((f"weight_ih_l{last}", 0, table, root))
            writer.append((f"weight_hh_l{last}", 0, table, root))
        else:
            entries.append(("weight_ih_l0", 1, tgt, root))
    elif any(True for _ in module.parameters(recurse=False)) or any(
        b is not None for b in module._buffers.values()
    ):
        names = [layer] if is_out else feeders(module) or [layer]
        raise ModelError(
            f"layer {layer!r} ({type(module).__name__}) is coupled with pruned channels but structured plans "
            f"cannot prune its tensors. HINT: list {' and '.join(repr(n) for n in names)} as unprunable."
        )
    return entries, writer


@contextlib.contextmanager
def _recurrent_stand_in(model: nn.Module) -> Iterator[None]:
    """Trace ``nn.GRU`` / ``nn.RNN`` as one op.

    Autograd decomposes them into their gate arithmetic (no fused op on CPU), which torch-pruning's
    trace cannot follow (measured: ``IndexError`` in its split mapping). While tracing, their forward
    is a stand-in with the same input and output shapes that reads the input through one matmul, so
    the graph couples their input features with the layers feeding them and their hidden units with
    the layers reading them, as for a fused LSTM.
    """
    patched = []
    for m in model.modules():
        if isinstance(m, nn.RNNBase) and not isinstance(m, nn.LSTM):
            def stand_in(input: torch.Tensor, hx: Any = None, _m: nn.RNNBase = m) -> tuple[torch.Tensor, torch.Tensor]:
                dirs = 2 if _m.bidirectional else 1
                ones = torch.ones(_m.input_size, _m.hidden_size * dirs, dtype=input.dtype, device=input.device)
                out = input @ ones
                batch = input.shape[0] if _m.batch_first or input.dim() == 2 else input.shape[1]
                h = torch.zeros(_m.num_layers * dirs, batch, _m.hidden_size, dtype=input.dtype, device=input.device)
                return out, h

            m.forward = stand_in  # an instance attribute shadows the class's forward
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


@contextlib.contextmanager
def _without_metrics(model: nn.Module) -> Iterator[None]:
    """Detach torchmetrics ``Metric`` submodules while tracing.

    A LightningModule often holds metrics as submodules; with them attached, torch-pruning's trace
    misses fused ops such as ``nn.LSTM`` (measured: no LSTM node at all). Metrics hold no
    ``state_dict`` entries, so the traced keys are unchanged.
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        yield
        return
    removed = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Metric):
                removed.append((parent, name, child))
    for parent, name, _ in removed:
        delattr(parent, name)
    try:
        yield
    finally:
        for parent, name, child in removed:
            setattr(parent, name, child)


# --------------------------------------------------------------------------------------------------
# self-check: sub-model forward == sparse-model forward, per group
# --------------------------------------------------------------------------------------------------
#: Ratios the self-check plans at.
CHECK_RATIOS = (0.3, 0.7)
#: Largest relative error (max |sub - sparse| / max |sparse|) the self-check accepts.
CHECK_TOLERANCE = 1e-4


def _self_check(planner: Planner, model: nn.Module, example: Any) -> None:
    """Refuse (``ModelError``) any group whose sub-model does not compute the sparse model's output."""
    if planner.num_groups == 0:
        return
    work = copy.deepcopy(model).float()  # float32 whatever the model's precision
    example = _float32(example)
    with _without_metrics(work):
        work.eval()
        own = work.state_dict()
        params = {n for n, _ in work.named_parameters()}
        state = _check_state(own, params)
        full = planner.layout.shapes
        for ratio in CHECK_RATIOS:
            plan = planner.plan(state, ratio)
            error = _compare(work, plan, state, full, example)[0]
            if math.isnan(error):  # the random tensors make the output non-finite: the model's own
                state = {k: v.clone() for k, v in own.items()}
                plan = planner.plan(state, ratio)
                error = _compare(work, plan, state, full, example)[0]
                if math.isnan(error):
                    raise ModelError(
                        f"{type(model).__name__}: the self-check cannot compare sub-models: the model's output on "
                        "the example input is not finite. HINT: pass another example input, or self_check=False "
                        "to trust the dependency graph unchecked."
                    )
            if error <= CHECK_TOLERANCE:
                continue
            failures = []
            for members in _check_units(planner.layout):
                kept = [torch.arange(s) for s in planner.layout.group_sizes]
                for g in members:
                    kept[g] = plan.kept[g]
                one = Plan._trusted(planner.layout, tuple(kept), None)
                error, exc = _compare(work, one, state, full, example)
                if not error <= CHECK_TOLERANCE:  # NaN too
                    failures.append((members, error, exc))
            if not failures:
                raise ModelError(
                    f"{type(model).__name__}: the sub-model at ratio {ratio} computes something else than the sparse "
                    "model although every group alone is exact: groups interact in a way the dependency graph does "
                    "not capture. HINT: list layers as unprunable until Planner.from_module accepts the model."
                )
            raise ModelError(_failure_message(planner, work, failures[0], ratio))


def _check_units(layout: Layout) -> list[tuple[int, ...]]:
    """Groups checked together: the layers of one LSTM / GRU / RNN (tied), every other group alone."""
    tied = {g for t in layout.ties for g in t}
    return [tuple(t) for t in layout.ties] + [(g,) for g in range(layout.num_groups) if g not in tied]


def _check_state(state: Mapping[str, torch.Tensor], params: set[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for the self-check: weights with ``1/sqrt(fan_in)`` scale, 1-d parameters
    (biases, norm parameters, layer scales) and BN means ``N(0, 0.5)``, BN variances in
    ``[0.5, 1.5]``, so that a channel the maps miss leaks a visible non-zero value; other buffers
    (masks, tables, counters) keep their values."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        stats = k.endswith(("running_mean", "running_var"))
        if not v.is_floating_point() or (k not in params and not stats):
            out[k] = v.clone()
            continue
        if k.endswith("running_var"):
            r = torch.rand(v.shape, generator=gen) + 0.5
        elif v.dim() <= 1:
            r = torch.randn(v.shape, generator=gen) * 0.5
        else:
            fan_in = max(1, v.numel() // v.shape[0])
            r = torch.randn(v.shape, generator=gen) / math.sqrt(fan_in)
        out[k] = r.to(dtype=v.dtype, device=v.device)
    return out


def _compare(
    work: nn.Module, plan: Plan, state: Mapping[str, torch.Tensor], full: Mapping[str, tuple[int, ...]], example: Any
) -> tuple[float, BaseException | None]:
    """Relative error between the sub-model's and the (norm-masked) sparse model's outputs;
    ``inf`` and the exception if the sub-model cannot be built or run; ``nan`` if the sparse
    model's output is not finite."""
    try:
        try:
            resize_module(work, plan.sub_shapes())
            work.load_state_dict(plan.extract(state))
            with torch.no_grad():
                sub_out = _tensors(_forward(work, example))
        finally:
            resize_module(work, full)
    except Exception as exc:  # noqa: BLE001 - any failure of the sub-model is the finding
        return math.inf, exc
    work.load_state_dict(plan.sparse(state))
    with torch.no_grad(), _masked_norms(work, plan):
        sparse_out = _tensors(_forward(work, example))
    if len(sub_out) != len(sparse_out) or any(a.shape != b.shape for a, b in zip(sub_out, sparse_out)):
        shapes = [tuple(t.shape) for t in sub_out], [tuple(t.shape) for t in sparse_out]
        return math.inf, _ShapeChange(f"the sub-model's outputs have shapes {shapes[0]}, the full model's {shapes[1]}")
    worst = 0.0
    for a, b in zip(sub_out, sparse_out):
        a, b = a.double(), b.double()
        finite = torch.isfinite(b)
        if not bool(finite.all()):
            return math.nan, None  # not comparable (the caller retries with the model's own tensors)
        if not bool(torch.isfinite(a).all()):
            return math.inf, None
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst, None


class _ShapeChange(Exception):
    """The group prunes the model's outputs."""


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _group_layers(layout: Layout, g: int) -> list[str]:
    """Module names whose tensors group ``g``'s channels index."""
    maps = {i for i, m in enumerate(layout.maps) if any(p.group == g for p in m.parts)}
    out: list[str] = []
    for key, dims in layout.dims.items():
        if any(d in maps for d in dims if d is not None):
            module = key.rsplit(".", 1)[0] if "." in key else key
            if module not in out:
                out.append(module)
    return out


def _flatten_readers(layout: Layout, g: int, work: nn.Module) -> list[str]:
    """Linear layers that read group ``g``'s channels through a flatten (several columns per channel)."""
    modules = dict(work.named_modules())
    out = []
    for key, dims in layout.dims.items():
        module = modules.get(key.rsplit(".", 1)[0] if "." in key else "")
        if not isinstance(module, nn.Linear) or not key.endswith("weight") or dims[1] is None:
            continue
        for p in layout.maps[dims[1]].parts:
            if p.group == g and p.tgt.numel() > layout.group_sizes[g]:
                out.append(key.rsplit(".", 1)[0])
    return out


def _failure_message(planner: Planner, work: nn.Module, failure: tuple, ratio: float) -> str:
    members, error, exc = failure
    layout = planner.layout
    names = [layout.group_names[g] for g in members]
    layers = list(dict.fromkeys(n for g in members for n in _group_layers(layout, g)))
    shown = ", ".join(repr(n) for n in layers[:8]) + (f" (+{len(layers) - 8} more)" if len(layers) > 8 else "")
    root = names[-1]
    head, _, tail = root.rpartition(".l")
    if tail.isdigit() and isinstance(dict(work.named_modules()).get(head), nn.RNNBase):
        root = head  # the group of one layer of an LSTM / GRU / RNN: list the module
    label = repr(names[0]) if len(names) == 1 else repr(names)
    if isinstance(exc, _ShapeChange):
        return (
            f"group {label} cannot be pruned: it prunes the model's output ({exc}). Its layers: {shown}. "
            f"HINT: list {root!r} (the output layer) as unprunable."
        )
    if exc is not None:
        cause = f"a sub-model that fails: {type(exc).__name__}: {str(exc)[:300]}"
    elif not math.isfinite(error):
        cause = "a sub-model whose output is not finite where the sparse model's is, or the reverse"
    else:
        cause = f"a sub-model whose output differs from the sparse model's (relative error {error:.2g})"
    readers = [r for g in members for r in _flatten_readers(layout, g, work)]
    if readers and exc is None:
        why = (
            f" Likely cause: the Linear {readers[0]!r} reads these channels through a flatten; torch-pruning maps "
            "its columns channels-first (column c*HW + j to channel c), which is wrong after a channels-last "
            "permute(0, 2, 3, 1).flatten(1)."
        )
    else:
        why = (
            " An operation between these layers mixes or reorders channels in a way the dependency graph does "
            "not capture (e.g. a reshape of channels into heads, a channels-last flatten)."
        )
    return (
        f"group {label} cannot be pruned: at ratio {ratio} it gives {cause}. "
        f"Its layers: {shown}.{why} HINT: list {root!r} as unprunable."
    )


@contextlib.contextmanager
def _masked_norms(model: nn.Module, plan: Plan) -> Iterator[None]:
    """While active, ``LayerNorm`` / ``GroupNorm`` whose channels ``plan`` prunes compute their
    statistics over the kept channels only (pruned channels output 0), as the sub-model's do."""
    masks: dict[int, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            key = f"{name}.weight" if name else "weight"
            if key not in plan.layout.shapes:
                continue
            idx = plan.indices(key)[-1]
            if idx is not None and idx.numel() < m.weight.shape[-1]:
                mask = torch.zeros(m.weight.shape[-1], dtype=torch.bool)
                mask[idx] = True
                masks[id(m.weight)] = mask.to(m.weight.device)
    if not masks:
        yield
        return
    layer_norm, group_norm = F.layer_norm, F.group_norm

    def masked_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: ANN001
        mask = masks.get(id(weight)) if weight is not None else None
        if mask is None or len(normalized_shape) != 1:
            return layer_norm(input, normalized_shape, weight, bias, eps)
        out = input.new_zeros(input.shape)
        kept = input[..., mask]
        out[..., mask] = layer_norm(kept, (kept.shape[-1],), weight[mask], None if bias is None else bias[mask], eps)
        return out

    def masked_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: ANN001
        mask = masks.get(id(weight)) if weight is not None else None
        if mask is None:
            return group_norm(input, num_groups, weight, bias, eps)
        out = input.new_zeros(input.shape)
        kept = input[:, mask]
        out[:, mask] = group_norm(kept, num_groups, weight[mask], None if bias is None else bias[mask], eps)
        return out

    F.layer_norm, F.group_norm = masked_layer_norm, masked_group_norm
    try:
        yield
    finally:
        F.layer_norm, F.group_norm = layer_norm, group_norm
