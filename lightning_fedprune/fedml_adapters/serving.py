"""Serve a client's trained model locally through FedML's inference runner (``/ready``, ``/predict``).

A client process writes each of its clients' trained models after every round (see
:mod:`.client`): the communicated tensors in the shapes the client trained (a FedMP client's
pruned sub-model) plus the tensors that never left the client (personalized layers). This module
rebuilds that exact network -- the registry model, reshaped by the client runtime's own loading
code -- and answers::

    GET  /ready    -> {"status": "Success"}
    POST /predict  {"inputs": [[...], ...]}   (a list of samples, each of the dataset's input shape)
                -> {"predictions": [...], "probabilities": [[...], ...], "client_id": c, "round": r}

with :class:`fedml.serving.FedMLInferenceRunner` (FastAPI + uvicorn, local only; no FedML cloud).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lightning_fedprune.errors import ConfigError, PayloadError
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig

log = logging.getLogger(__name__)

__all__ = ["load_client_model", "ClientModel", "make_predictor", "serve_client_model"]


class ClientModel:
    """A client's trained model ready for inference.

    Attributes:
        module: the rebuilt module (eval mode).
        client_id / round: whose model, trained in which round.
        input_shape: one sample's shape.
        input_dtype: ``torch.float32`` (classifiers) or ``torch.long`` (language models).
    """

    def __init__(self, module: Any, *, client_id: int, round: int, input_shape: tuple[int, ...], input_dtype: torch.dtype) -> None:
        self.module = module.eval()
        self.client_id = int(client_id)
        self.round = int(round)
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype

    @torch.no_grad()
    def predict(self, inputs: Any, *, max_batch: int = 4096) -> dict[str, Any]:
        """Predictions for a list of samples (nested lists of numbers).

        Raises:
            PayloadError: the inputs are not a non-empty list of samples of :attr:`input_shape`.
        """
        try:
            x = torch.as_tensor(inputs, dtype=self.input_dtype)
        except (TypeError, ValueError, RuntimeError) as err:
            raise PayloadError(f"`inputs` must be a list of samples of shape {list(self.input_shape)}: {err}") from None
        if x.dim() == len(self.input_shape):
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape or not 1 <= x.shape[0] <= max_batch:
            raise PayloadError(
                f"`inputs` must hold 1..{max_batch} samples of shape {list(self.input_shape)}, got shape {list(x.shape)}"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise PayloadError("`inputs` hold NaN or infinite values")
        logits = self.module(x)
        probs = torch.softmax(logits.float(), dim=-1)
        return {
            "predictions": logits.argmax(dim=-1).tolist(),
            "probabilities": probs.tolist(),
            "client_id": self.client_id,
            "round": self.round,
        }


def load_client_model(cfg: DeploymentConfig, client_id: int, *, path: str | os.PathLike[str] | None = None) -> ClientModel:
    """Rebuild the trained model of ``client_id`` from the file its client process wrote.

    Args:
        cfg: the deployment config the client ran with.
        client_id: the client.
        path: the model file (default: :func:`~lightning_fedprune.fedml_adapters.client.model_path`).

    Raises:
        ConfigError: no model file (the client has not finished a round yet).
    """
    from lightning_fedprune.core.messages import ClientTask
    from lightning_fedprune.core.serialization import load_state
    from lightning_fedprune.fedml_adapters.client import model_path
    from lightning_fedprune.fedml_adapters.components import build_client_module
    from lightning_fedprune.runtime import LOCAL_STATE_KEY, ClientRuntime

    path = Path(path) if path is not None else model_path(cfg, client_id)
    if not path.is_file():
        raise ConfigError(f"no trained model of client {client_id} at {path}: has its client process finished a round?")
    state = load_state(path)
    info = SimpleNamespace(**state["info"])
    info.input_shape = tuple(int(v) for v in info.input_shape)
    module = build_client_module(cfg, info)
    task = ClientTask(round=int(state["round"]), client_id=int(state["client_id"]), weights=state["weights"], config=state["config"])
    # the runtime's own loading: reshapes a sub-model's layers, then loads the local tensors
    ClientRuntime(module, data=None, seed=cfg.recipe.seed).load_task(module, task, {LOCAL_STATE_KEY: state["local"]})
    dtype = torch.long if info.task == "language_model" else torch.float32
    return ClientModel(module, client_id=task.client_id, round=task.round, input_shape=info.input_shape, input_dtype=dtype)


def make_predictor(model: ClientModel) -> Any:
    """A :class:`fedml.serving.FedMLPredictor` answering with ``model`` (imports FedML)."""
    from fastapi import HTTPException
    from fedml.serving import FedMLPredictor

    class ClientModelPredictor(FedMLPredictor):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def predict(self, request: Any, header: Any = None) -> dict[str, Any]:
            if not isinstance(request, dict) or "inputs" not in request:
                raise HTTPException(status_code=400, detail='send {"inputs": [sample, ...]}')
            try:
                return self.model.predict(request["inputs"])
            except PayloadError as err:
                raise HTTPException(status_code=400, detail=str(err)) from None

        def ready(self) -> bool:
            return True

    return ClientModelPredictor()


def serve_client_model(cfg: DeploymentConfig, client_id: int, *, host: str = "127.0.0.1", port: int = 2345) -> None:
    """Serve the trained model of ``client_id`` on ``host:port`` until interrupted (blocks)."""
    from lightning_fedprune.fedml_adapters.transport import quiet_fedml_environment

    model = load_client_model(cfg, client_id)
    quiet_fedml_environment()
    from fedml.serving import FedMLInferenceRunner

    log.info("serving the model of client %d (round %d) on http://%s:%d (/ready, /predict)", client_id, model.round, host, port)
    FedMLInferenceRunner(make_predictor(model), host=host, port=int(port)).run()
