"""What a server or a client process builds from a deployment config (no FedML here).

Both take their parts from :func:`lightning_fedprune.config.build_parts`, the builder the
simulation uses, so a deployment and a simulation of one recipe start from the same state:

* the server (role ``"server"``): the strategy initialized from the recipe's initial weights (and
  PruneFL's server-side pruning), the evaluation module and the global test set; device profiles
  only when the strategy is told about them;
* a client process (role ``"client"``): its module and the same
  :class:`~lightning_fedprune.runtime.ClientRuntime` the simulator uses, over either the recipe's
  dataset (it trains only its own partition) or a data folder holding nothing but its own samples
  (:func:`export_client_data`, for edge devices). A client builds no strategy and no devices.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import TensorDataset

from lightning_fedprune.config import RecipeConfig, RunParts, build_module, build_parts
from lightning_fedprune.core.rounds import RoundRules
from lightning_fedprune.core.seeding import derive_seed
from lightning_fedprune.errors import ConfigError, DataError
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

log = logging.getLogger(__name__)

__all__ = [
    "build_server_parts",
    "build_client_runtime",
    "build_client_module",
    "round_rules",
    "LocalClientData",
    "export_client_data",
    "dataset_info",
    "DATA_META_FILE",
]

DATA_META_FILE = "client_data.json"
_DATA_FORMAT = 1
#: recipe keys that decide which samples a client holds: an exported folder must match them
_DATA_KEYS = ("name", "num_clients", "partition", "partition_options", "local_test_fraction", "options")


def round_rules(recipe: RecipeConfig) -> RoundRules:
    """The round rules of the recipe's ``engine`` section."""
    e = recipe.engine
    return RoundRules(
        mode=e.mode, deadline_fraction=e.deadline_fraction, deadline_factor=e.deadline_factor,
        deadline_backoff=e.deadline_backoff, async_m=e.async_m, join_rounds=dict(e.join_rounds),
    )


def build_server_parts(cfg: DeploymentConfig) -> RunParts:
    """The server's parts of ``cfg.recipe`` (:func:`~lightning_fedprune.config.build_parts`, role ``"server"``)."""
    return build_parts(cfg.recipe, role="server")


def build_client_runtime(cfg: DeploymentConfig, rank: int) -> Any:
    """The ClientRuntime of the process of ``rank``.

    With ``data_args.data_cache_dir`` set, the data comes from that folder (written by
    :func:`export_client_data`); otherwise the recipe's dataset is loaded and partitioned and the
    process trains only its own clients' partitions.

    Raises:
        ConfigError: the folder was exported for other clients or another data set-up.
    """
    clients = cfg.clients_of_rank(rank)
    data = None
    if cfg.data_args.data_cache_dir is not None:
        data = LocalClientData.load(cfg.resolve_path(cfg.data_args.data_cache_dir), recipe=cfg.recipe)
        missing = [c for c in clients if c not in data.client_ids]
        if missing:
            raise ConfigError(
                f"`data_args.data_cache_dir` {cfg.data_args.data_cache_dir} holds clients {data.client_ids}, but rank "
                f"{rank} serves {clients}: export the data for this rank (python -m lightning_fedprune export-data "
                f"CONFIG --rank {rank} --out DIR)"
            )
    return build_parts(cfg.recipe, role="client", client_data=data).runtime


def build_client_module(cfg: DeploymentConfig, info: Any) -> Any:
    """The federated module of ``cfg.recipe`` (:func:`~lightning_fedprune.config.build_module`).

    Args:
        cfg: the deployment config.
        info: the dataset's ``name``, ``task``, ``num_classes`` and ``input_shape`` (a
            :class:`~lightning_fedprune.data.DatasetSplits` or the ``info`` of exported data).
    """
    return build_module(cfg.recipe, info)


def dataset_info(cfg: DeploymentConfig, runtime: Any = None) -> dict[str, Any]:
    """``{"name", "task", "num_classes", "input_shape"}`` of the recipe's dataset (what rebuilding the model needs).

    Taken from ``runtime.data.info`` when the runtime reads exported data, else from the dataset.
    """
    info = getattr(getattr(runtime, "data", None), "info", None)
    if info is None:
        from lightning_fedprune.data import load_dataset

        d = cfg.recipe.data
        info = load_dataset(d.name, root=d.root, **d.options)
    return {
        "name": str(info.name),
        "task": str(info.task),
        "num_classes": int(info.num_classes),
        "input_shape": [int(v) for v in info.input_shape],
    }


class LocalClientData:
    """The data of a few clients, read from an exported folder (the rest of the dataset absent).

    Same interface and the same data order as :class:`~lightning_fedprune.data.FederatedDataset`:
    pass ``e`` of round ``r`` of client ``c`` is shuffled with ``derive_seed(seed, "data", r, c, e)``
    over the client's samples in their partition order, so training is identical.

    Args:
        clients: client id -> ``(train TensorDataset, local test TensorDataset or None)``.
        info: dataset description (``name``, ``task``, ``num_classes``, ``input_shape``).
        batch_size / eval_batch_size: as the recipe's ``data`` section.
    """

    def __init__(
        self,
        clients: dict[int, tuple[TensorDataset, TensorDataset | None]],
        *,
        info: Any,
        batch_size: int,
        eval_batch_size: int,
    ) -> None:
        from lightning_fedprune.data.federated import FederatedDataset

        if not clients:
            raise DataError("exported client data holds no client")
        self.info = info
        self._views: dict[int, Any] = {}
        for cid, (train, test) in clients.items():
            n = len(train)
            if test is not None and len(test):
                x = torch.cat([train.tensors[0], test.tensors[0]])
                y = torch.cat([train.tensors[1], test.tensors[1]])
                view = FederatedDataset(
                    TensorDataset(x, y), [list(range(n))], client_test=[list(range(n, len(x)))],
                    batch_size=batch_size, eval_batch_size=eval_batch_size,
                )
            else:
                view = FederatedDataset(train, [list(range(n))], batch_size=batch_size, eval_batch_size=eval_batch_size)
            self._views[int(cid)] = view

    @property
    def client_ids(self) -> list[int]:
        return sorted(self._views)

    @property
    def num_clients(self) -> int:
        return len(self._views)

    def _view(self, client_id: int) -> Any:
        try:
            return self._views[int(client_id)]
        except KeyError:
            raise DataError(f"client {client_id} has no data here (this folder holds clients {self.client_ids})") from None

    def num_train_samples(self, client_id: int) -> int:
        return self._view(client_id).num_train_samples(0)

    def train_batches(self, client_id: int, *, run_seed: int, rnd: int, epoch: int) -> Any:
        return self._view(client_id).train_pass(0, seed=derive_seed(run_seed, "data", rnd, client_id, epoch))

    def train_steps(self, client_id: int, num_steps: int, *, run_seed: int, rnd: int) -> Any:
        from lightning_fedprune.data.loaders import StepsLoader

        return StepsLoader(self._view(client_id).train_pass(0, seed=derive_seed(run_seed, "data", rnd, client_id, 0)), num_steps)

    def local_test_loader(self, client_id: int) -> Any:
        return self._view(client_id).local_test_loader(0)

    def test_loader(self) -> None:
        return None

    # -------------------------------------------------------------- files
    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, recipe: Any = None) -> LocalClientData:
        """Read a folder written by :func:`export_client_data`.

        Args:
            folder: the folder.
            recipe: when given, its data set-up (dataset, partition, clients, seed, batch sizes)
                must be the one the folder was exported with.

        Raises:
            ConfigError: the folder is missing, malformed, or exported for another set-up.
        """
        from lightning_fedprune.core.serialization import load_state

        folder = Path(folder)
        meta_path = folder / DATA_META_FILE
        if not meta_path.is_file():
            raise ConfigError(
                f"`data_args.data_cache_dir`: {folder} holds no {DATA_META_FILE}; write it with "
                "`python -m lightning_fedprune export-data CONFIG --rank N --out DIR`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ConfigError(f"{meta_path} is not JSON: {err}") from None
        if meta.get("format") != _DATA_FORMAT:
            raise ConfigError(f"{meta_path} has format {meta.get('format')!r}, expected {_DATA_FORMAT}")
        if recipe is not None:
            want = _data_fingerprint(recipe)
            if meta.get("recipe") != want:
                diff = sorted(k for k in set(want) | set(meta.get("recipe", {})) if want.get(k) != meta.get("recipe", {}).get(k))
                raise ConfigError(
                    f"{folder} was exported for another data set-up (differs in {', '.join(diff)}); export it again "
                    "from this config"
                )
        info = SimpleNamespace(
            name=meta["dataset"], task=meta["task"], num_classes=int(meta["num_classes"]),
            input_shape=tuple(int(v) for v in meta["input_shape"]),
        )
        clients: dict[int, tuple[TensorDataset, TensorDataset | None]] = {}
        for cid in meta["clients"]:
            state = load_state(folder / f"client_{int(cid)}.safetensors")
            train = TensorDataset(state["train_x"], state["train_y"])
            test = TensorDataset(state["test_x"], state["test_y"]) if state["test_x"].shape[0] else None
            clients[int(cid)] = (train, test)
        return cls(clients, info=info, batch_size=int(meta["batch_size"]), eval_batch_size=int(meta["eval_batch_size"]))


def _data_fingerprint(recipe: Any) -> dict[str, Any]:
    d = recipe.data
    out = {k: getattr(d, k) for k in _DATA_KEYS}
    out.update(seed=recipe.seed, batch_size=d.batch_size, eval_batch_size=d.eval_batch_size)
    return json.loads(json.dumps(out))


def export_client_data(cfg: DeploymentConfig, rank: int, out_dir: str | os.PathLike[str]) -> Path:
    """Write the samples of the clients served by ``rank`` (and nothing else) to ``out_dir``.

    The folder holds ``client_data.json`` and one ``client_<id>.safetensors`` per client (train
    and local test tensors in partition order). A client process with ``data_args.data_cache_dir``
    pointing at it trains exactly as one that loads the whole dataset.

    Returns:
        The folder.
    """
    from lightning_fedprune.core.serialization import save_state
    from lightning_fedprune.data import load_dataset, make_partition

    r = cfg.recipe
    d = r.data
    splits = load_dataset(d.name, root=d.root, **d.options)
    partition = make_partition(
        d.partition, splits.train_targets, d.num_clients, seed=r.seed, local_test_fraction=d.local_test_fraction,
        groups=splits.train_groups, **d.partition_options,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_all, y_all = splits.train.tensors[0], splits.train.tensors[1]
    clients = cfg.clients_of_rank(rank)
    for cid in clients:
        split = partition.clients[cid]
        tr = torch.tensor(split.train, dtype=torch.long)
        te = torch.tensor(split.test, dtype=torch.long)
        save_state(
            {"train_x": x_all[tr].clone(), "train_y": y_all[tr].clone(), "test_x": x_all[te].clone(), "test_y": y_all[te].clone()},
            out / f"client_{cid}.safetensors",
        )
    meta = {
        "format": _DATA_FORMAT,
        "dataset": splits.name,
        "task": splits.task,
        "num_classes": int(splits.num_classes),
        "input_shape": [int(v) for v in splits.input_shape],
        "batch_size": d.batch_size,
        "eval_batch_size": d.eval_batch_size,
        "clients": clients,
        "recipe": _data_fingerprint(r),
    }
    (out / DATA_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("exported clients %s of rank %d to %s", clients, rank, out)
    return out
