"""Per-client persistent state (SCAFFOLD's ``c_i``, personalised layers, gates, ...).

The state of a client belongs to the client: a transport keeps one :class:`ClientStore` on the
client side (the simulation engine keeps all clients' in one; a FedML client process keeps its
own). States are nested dicts of tensors and JSON values. With ``spill_dir`` every client's state
lives in its own safetensors file instead of memory; with ``memory_budget`` the most recently
used states stay in memory up to that many bytes and the others are spilled (for many clients).
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lightning_fedprune.core.serialization import dumps_state, loads_state, save_encoded
from lightning_fedprune.errors import ConfigError

__all__ = ["ClientStore"]


class ClientStore:
    """A map ``client_id -> state dict`` that can be checkpointed.

    States are kept encoded (safetensors bytes), so a stored state is a copy and its size is known.

    Args:
        spill_dir: where states go on disk: every state when ``memory_budget`` is ``None``, else
            the least recently used ones beyond the budget.
        memory_budget: bytes of encoded states kept in memory; beyond it the least recently used
            states are spilled to ``spill_dir`` (a temporary folder when ``None``) and read back
            when asked for. ``None``: no limit (or everything on disk with ``spill_dir``).

    Raises:
        ConfigError: a negative ``memory_budget``.
    """

    def __init__(self, spill_dir: str | os.PathLike | None = None, *, memory_budget: int | None = None) -> None:
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0):
            raise ConfigError(f"`memory_budget` must be null or a number of bytes >= 0, got {memory_budget!r}")
        self._mem: OrderedDict[int, bytes] = OrderedDict()
        self._mem_bytes = 0
        self.memory_budget = memory_budget
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if memory_budget is not None and spill_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lfp-client-states-")
            spill_dir = self._tmp.name
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._on_disk: set[int] = set()
        if self.spill_dir is not None:
            self._on_disk = {int(p.stem.split("_")[1]) for p in self.spill_dir.glob("client_*.safetensors")}

    @property
    def memory_bytes(self) -> int:
        """Bytes of encoded states held in memory."""
        return self._mem_bytes

    def _path(self, client_id: int) -> Path:
        assert self.spill_dir is not None
        return self.spill_dir / f"client_{int(client_id)}.safetensors"

    def _all_on_disk(self) -> bool:
        return self.spill_dir is not None and self.memory_budget is None

    def get(self, client_id: int) -> dict[str, Any]:
        """A fresh copy of the client's state (empty dict for a client never seen)."""
        blob = self.get_encoded(client_id)
        return loads_state(blob) if blob else {}

    def get_encoded(self, client_id: int) -> bytes:
        """The client's state as stored (:func:`~lightning_fedprune.core.serialization.dumps_state`
        bytes; empty for a client never seen): what a process boundary carries, never re-encoded."""
        cid = int(client_id)
        blob = self._mem.get(cid)
        if blob is not None:
            self._mem.move_to_end(cid)
            return blob
        if cid in self._on_disk:
            return self._path(cid).read_bytes()
        return b""

    def put(self, client_id: int, state: dict[str, Any]) -> None:
        """Store (a copy of) the client's state; an empty state removes it."""
        self.put_encoded(client_id, dumps_state(state) if state else b"")

    def put_encoded(self, client_id: int, blob: bytes) -> None:
        """Store a state given as :meth:`get_encoded` bytes (validated when it is read); empty bytes remove it."""
        cid = int(client_id)
        old = self._mem.pop(cid, None)
        if old is not None:
            self._mem_bytes -= len(old)
        if cid in self._on_disk:
            self._path(cid).unlink(missing_ok=True)
            self._on_disk.discard(cid)
        if not blob:
            return
        blob = bytes(blob)
        if self._all_on_disk():
            save_encoded(blob, self._path(cid))
            self._on_disk.add(cid)
            return
        self._mem[cid] = blob
        self._mem_bytes += len(blob)
        if self.memory_budget is not None:
            while self._mem_bytes > self.memory_budget and self._mem:
                old_cid, old_blob = self._mem.popitem(last=False)  # the least recently used
                self._mem_bytes -= len(old_blob)
                save_encoded(old_blob, self._path(old_cid))
                self._on_disk.add(old_cid)

    def client_ids(self) -> list[int]:
        return sorted(set(self._mem) | self._on_disk)

    def state_dict(self) -> dict[str, Any]:
        return {str(cid): self.get(cid) for cid in self.client_ids()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cid in self.client_ids():
            self.put(cid, {})
        for cid, s in state.items():
            self.put(int(cid), s)
