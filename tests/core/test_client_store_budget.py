"""Client states beyond a memory budget are spilled to disk, least recently used first."""

from __future__ import annotations

import pytest
import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.serialization import dumps_state
from lightning_fedprune.errors import ConfigError


def _state(i: int) -> dict:
    return {"c": {"w": torch.full((64,), float(i))}, "round": i}


def test_least_recently_used_states_are_spilled_and_read_back(tmp_path):
    size = len(dumps_state(_state(0)))  # every state encodes to the same size here
    store = ClientStore(tmp_path, memory_budget=2 * size)
    for i in range(4):
        store.put(i, _state(i))
    assert store.memory_bytes == 2 * size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client_0.safetensors", "client_1.safetensors"]
    assert store.client_ids() == [0, 1, 2, 3]
    # reading client 2 makes it the most recent: storing client 4 spills client 3
    assert store.get(2)["round"] == 2
    store.put(4, _state(4))
    assert (tmp_path / "client_3.safetensors").exists() and not (tmp_path / "client_2.safetensors").exists()
    for i in range(5):
        got = store.get(i)
        assert got["round"] == i and torch.equal(got["c"]["w"], torch.full((64,), float(i)))
    # an update of a spilled client replaces its file; an empty state removes it everywhere
    store.put(0, _state(10))
    assert not (tmp_path / "client_0.safetensors").exists()  # the newest state is in memory
    assert store.get(0)["round"] == 10
    store.put(1, {})
    assert 1 not in store.client_ids() and not (tmp_path / "client_1.safetensors").exists()
    assert store.memory_bytes <= 2 * size


def test_a_budget_without_a_folder_spills_to_a_temporary_one():
    store = ClientStore(memory_budget=0)
    store.put(7, _state(7))
    assert store.memory_bytes == 0 and store.get(7)["round"] == 7
    assert list(store.state_dict()) == ["7"]


def test_the_budget_is_checked():
    with pytest.raises(ConfigError, match="`memory_budget` must be null or a number of bytes >= 0"):
        ClientStore(memory_budget=-1)


def test_encoded_states_pass_through_unchanged(tmp_path):
    store = ClientStore(tmp_path, memory_budget=0)  # every state spilled: the bytes come from disk
    blob = dumps_state(_state(3))
    store.put_encoded(3, blob)
    assert store.get_encoded(3) == blob and store.get(3)["round"] == 3
    assert (tmp_path / "client_3.safetensors").stat().st_mode & 0o777 == 0o600
    assert store.get_encoded(9) == b"" and store.get(9) == {}
    store.put_encoded(3, b"")
    assert store.client_ids() == []
