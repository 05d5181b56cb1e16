"""Per-client persistent state (SCAFFOLD's ``c_i``, personalised layers, gates, ...).

The state of a client belongs to the client: a transport keeps one :class:`ClientStore` on the
client side (the simulation engine keeps all clients' in one; a FedML client process keeps its
own). States are nested dicts of tensors and JSON values. With ``spill_dir`` every client's state
lives in its own safetensors file instead of memory (for many clients).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_fedprune.core.serialization import dumps_state, load_state, loads_state, save_state

__all__ = ["ClientStore"]


class ClientStore:
    """A map ``client_id -> state dict`` that can be checkpointed.

    Args:
        spill_dir: keep states on disk (one file per client) instead of in memory.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None) -> None:
        self._mem: dict[int, bytes] = {}
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"client_{int(client_id)}.safetensors"

    def get(self, client_id: int) -> dict[str, Any]:
        """A fresh copy of the client's state (empty dict for a client never seen)."""
        if self.spill_dir is not None:
            p = self._path(client_id)
            return load_state(p) if p.exists() else {}
        blob = self._mem.get(int(client_id))
        return loads_state(blob) if blob is not None else {}

    def put(self, client_id: int, state: dict[str, Any]) -> None:
        """Store (a copy of) the client's state; an empty state removes it."""
        if self.spill_dir is not None:
            p = self._path(client_id)
            if state:
                save_state(state, p)
            elif p.exists():
                p.unlink()
            return
        if state:
            self._mem[int(client_id)] = dumps_state(state)
        else:
            self._mem.pop(int(client_id), None)

    def client_ids(self) -> list[int]:
        if self.spill_dir is not None:
            return sorted(int(p.stem.split("_")[1]) for p in self.spill_dir.glob("client_*.safetensors"))
        return sorted(self._mem)

    def state_dict(self) -> dict[str, Any]:
        return {str(cid): self.get(cid) for cid in self.client_ids()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cid in self.client_ids():
            self.put(cid, {})
        for cid, s in state.items():
            self.put(int(cid), s)
