"""Pickle-free nested-state serialization and the per-client store."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct

import pytest
import torch

from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.serialization import (
    dumps_state,
    flatten_state,
    load_state,
    loads_state,
    save_state,
    unflatten_state,
)
from lightning_fedprune.errors import PayloadError


def _nested() -> dict:
    return {
        "global": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3, dtype=torch.int64)},
        "arms": [1, 2.5, {"t": torch.tensor([True, False])}],
        "pair": (4, torch.tensor([1.5], dtype=torch.float64)),
        "nested_tuple": ((1, 2), [3, (4,)]),
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 1e-300],
        "none": None,
        "flag": True,
        "name": "fedavg",
        "empty": {},
        "empty_list": [],
        "round": 7,
    }


def _assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_nested_state_round_trips_through_bytes():
    # Prepare
    state = _nested()
    # Execute
    out = loads_state(dumps_state(state))
    # Assert
    _assert_same(state, out)
    assert isinstance(out["pair"], tuple) and isinstance(out["nested_tuple"][1][1], tuple)
    assert math.copysign(1.0, out["floats"][3]) == -1.0


def test_nested_state_round_trips_through_a_file(tmp_path):
    path = tmp_path / "sub" / "state.safetensors"
    save_state(_nested(), path)
    assert path.exists() and not (tmp_path / "sub" / "state.safetensors.tmp").exists()
    _assert_same(_nested(), load_state(path))


def test_flatten_gives_json_skeleton_and_flat_tensors():
    skeleton, tensors = flatten_state({"a": {"b": torch.zeros(2)}, "c": [torch.ones(1)], "d": float("nan")})
    assert skeleton == {"a": {"b": {"__tensor__": "a/b"}}, "c": [{"__tensor__": "c/0"}], "d": {"__float__": "nan"}}
    assert set(tensors) == {"a/b", "c/0"}
    json.dumps(skeleton, allow_nan=False)  # strict JSON
    assert torch.equal(unflatten_state(skeleton, tensors)["a"]["b"], torch.zeros(2))


def test_top_level_tensor_round_trips():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(loads_state(dumps_state(t)), t)


def test_non_string_keys_are_refused():
    with pytest.raises(TypeError, match=r"state keys must be str, got int \(1\)"):
        dumps_state({1: torch.zeros(1)})


def test_unserializable_values_are_refused():
    with pytest.raises(TypeError, match="cannot serialize object at 'a/x'"):
        dumps_state({"a": {"x": object()}})


def test_loaded_tensors_do_not_alias_the_original():
    t = torch.zeros(3)
    out = loads_state(dumps_state({"t": t}))
    t += 1
    assert torch.equal(out["t"], torch.zeros(3))


def test_dangling_tensor_reference_is_rejected():
    from safetensors.torch import save as st_save

    blob = st_save({"x": torch.zeros(1)}, metadata={"lfp_state": json.dumps({"a": {"__tensor__": "missing"}})})
    with pytest.raises(PayloadError, match="tensor 'missing' that the payload does not hold"):
        loads_state(blob)


def test_payload_without_state_metadata_is_rejected():
    from safetensors.torch import save as st_save

    with pytest.raises(PayloadError, match="no 'lfp_state' metadata"):
        loads_state(st_save({"x": torch.zeros(1)}))


def test_state_skeleton_that_is_not_json_is_rejected():
    from safetensors.torch import save as st_save

    with pytest.raises(PayloadError, match="state skeleton is not JSON"):
        loads_state(st_save({"x": torch.zeros(1)}, metadata={"lfp_state": "{nope"}))


@pytest.mark.parametrize("garbage", [b"", b"1234567", struct.pack("<Q", 99) + b"{}", b"\x80\x04K\x01."])
def test_garbage_is_rejected(garbage):
    with pytest.raises(PayloadError):
        loads_state(garbage)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_is_rejected_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(PayloadError):
        loads_state(pickle.dumps({"state": _Exploit(marker)}))
    assert not marker.exists()


# ----------------------------------------------------------------------------- ClientStore


@pytest.fixture(params=["memory", "spill"])
def store(request, tmp_path) -> ClientStore:
    return ClientStore() if request.param == "memory" else ClientStore(spill_dir=tmp_path / "clients")


def test_store_get_of_unknown_client_is_empty(store):
    assert store.get(3) == {}
    assert store.client_ids() == []


def test_store_put_get_round_trip_is_a_copy(store):
    # Prepare
    c_i = {"w": torch.tensor([1.0, 2.0])}
    state = {"scaffold.c_i": c_i, "count": 2, "nan": float("nan")}
    # Execute
    store.put(4, state)
    c_i["w"] += 100  # mutating the caller's dict after put must not change the store
    got = store.get(4)
    got["scaffold.c_i"]["w"] -= 7  # nor mutating what get returned
    again = store.get(4)
    # Assert
    assert torch.equal(again["scaffold.c_i"]["w"], torch.tensor([1.0, 2.0]))
    assert again["count"] == 2 and math.isnan(again["nan"])
    assert store.client_ids() == [4]


def test_store_put_empty_removes_the_client(store):
    store.put(1, {"a": 1})
    store.put(2, {"a": 2})
    store.put(1, {})
    assert store.client_ids() == [2]
    assert store.get(1) == {}
    store.put(5, {})  # removing a client that was never stored is fine
    assert store.client_ids() == [2]


def test_store_state_dict_round_trip(store, tmp_path):
    # Prepare
    store.put(0, {"c": torch.zeros(2)})
    store.put(10, {"c": torch.ones(2), "k": [1, 2]})
    # Execute: through bytes, into a fresh store of the other kind, replacing what it held
    sd = loads_state(dumps_state(store.state_dict()))
    other = ClientStore(spill_dir=tmp_path / "other") if store.spill_dir is None else ClientStore()
    other.put(99, {"stale": 1})
    other.load_state_dict(sd)
    # Assert
    assert set(sd) == {"0", "10"}
    assert other.client_ids() == [0, 10]
    assert torch.equal(other.get(10)["c"], torch.ones(2)) and other.get(10)["k"] == [1, 2]
    assert torch.equal(other.get(0)["c"], torch.zeros(2))
    assert other.get(99) == {}


def test_spilled_store_keeps_one_file_per_client(tmp_path):
    store = ClientStore(spill_dir=tmp_path / "s")
    store.put(2, {"x": torch.zeros(1)})
    store.put(11, {"x": torch.zeros(1)})
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["client_11.safetensors", "client_2.safetensors"]
    # a second store on the same directory sees the same clients (states live on disk)
    assert ClientStore(spill_dir=tmp_path / "s").client_ids() == [2, 11]
