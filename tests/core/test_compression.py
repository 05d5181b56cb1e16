"""FlexCom's top-k upload compression: exact selections, index dtypes, real bytes, validation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lightning_fedprune.core.compression import (
    TOPK_PREFIX,
    compress_upload,
    decode_topk_result,
    index_dtype,
    keep_ratio_for_bandwidth,
    topk_compress,
    topk_count,
    topk_decompress,
)
from lightning_fedprune.errors import ConfigError, PayloadError


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ----------------------------------------------------------------------------- selection


def test_exact_topk_on_a_hand_made_tensor():
    # |values|: 3.0 at 1 and 5, 2.0 at 2 and 3 (tie -> the lower index 2 wins)
    update = {"w": _t(0.5, -3.0, 2.0, -2.0, 0.1, 3.0, 0.0, 1.0).reshape(2, 4)}
    payload = topk_compress(update, 0.375)  # k = ceil(0.375 * 8) = 3
    assert set(payload) == {"w/idx", "w/val"}
    assert payload["w/idx"].dtype == torch.uint8
    assert payload["w/idx"].tolist() == [1, 2, 5]
    assert payload["w/val"].dtype == torch.float32
    assert payload["w/val"].tolist() == [-3.0, 2.0, 3.0]
    (dense,) = topk_decompress(payload, {"w": (2, 4)}).values()
    assert dense.tolist() == [[0.0, -3.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]


def test_ties_break_to_the_lower_index_everywhere():
    update = {"w": torch.ones(100)}
    assert topk_compress(update, 0.05)["w/idx"].tolist() == [0, 1, 2, 3, 4]
    update = {"w": torch.tensor([1.0, -5.0, 1.0, 1.0, 5.0, -1.0] * 10)}
    # k = 30: the twenty 5s (indices 1, 4, 7, ...) and the first ten 1s (0, 2, 3, 5, ...), increasing
    fives = list(range(1, 60, 3))
    ones = [i for i in range(60) if i % 3 != 1][:10]
    assert ones == [0, 2, 3, 5, 6, 8, 9, 11, 12, 14]
    assert topk_compress(update, 0.5)["w/idx"].tolist() == sorted(fives + ones)


@pytest.mark.parametrize(
    ("numel", "ratio", "k"),
    [(30, 0.1, 3), (10, 0.01, 1), (10, 1.0, 10), (7, 0.5, 4), (1000, 0.001, 1), (3, 0.34, 2)],
)
def test_topk_count(numel, ratio, k):
    assert topk_count(numel, ratio) == k


@pytest.mark.parametrize(
    ("numel", "dtype"),
    [
        (1, torch.uint8),
        (256, torch.uint8),  # indices 0..255
        (257, torch.int16),
        (32768, torch.int16),  # 0..32767
        (32769, torch.int32),
        (2**31, torch.int32),
        (2**31 + 1, torch.int64),
    ],
)
def test_index_dtype_boundaries(numel, dtype):
    assert index_dtype(numel) == dtype


def test_compressed_index_dtype_follows_the_tensor_size():
    for numel, dtype in [(256, torch.uint8), (257, torch.int16), (40000, torch.int32)]:
        update = {"w": torch.arange(numel, dtype=torch.float32)}
        payload = topk_compress(update, 0.01)
        assert payload["w/idx"].dtype == dtype
        # the largest entries are the last ones
        assert payload["w/idx"].to(torch.int64).tolist() == list(range(numel - topk_count(numel, 0.01), numel))


def test_dense_when_it_is_smaller():
    # 10 elements, uint8 index: sparse costs 5 bytes per kept value, dense 40 bytes
    upd = {"w": torch.linspace(-1, 1, 10)}
    assert set(topk_compress(upd, 0.8)) == {"w/idx", "w/val"}  # k = 8 -> 40 bytes, not smaller than dense 40
    assert set(topk_compress(upd, 0.9)) == {"w/dense"}  # k = 9 -> 45 > 40
    assert set(topk_compress(upd, 1.0)) == {"w/dense"}
    payload = topk_compress(upd, 0.9)
    assert torch.equal(payload["w/dense"], upd["w"])


# ----------------------------------------------------------------------------- round trip and bytes


def test_round_trip_keeps_exactly_the_topk_positions():
    gen = torch.Generator().manual_seed(0)
    update = {
        "a.weight": torch.randn(16, 8, generator=gen), "a.bias": torch.randn(16, generator=gen),
        "b": torch.randn(3, 3, 3, generator=gen, dtype=torch.float64),
    }
    shapes = {k: tuple(v.shape) for k, v in update.items()}
    payload = topk_compress(update, 0.2)
    back = topk_decompress(payload, shapes)
    for key, u in update.items():
        k = topk_count(u.numel(), 0.2)
        keep = torch.zeros(u.numel(), dtype=torch.bool)
        keep[u.abs().reshape(-1).argsort(descending=True)[:k]] = True
        keep = keep.reshape(u.shape)
        assert back[key].dtype == torch.float32 and back[key].shape == u.shape
        assert torch.equal(back[key][keep], u[keep].float())
        assert torch.count_nonzero(back[key][~keep]) == 0
    # keep ratio 1 sends every value (dense) and returns the update itself
    full = topk_decompress(topk_compress(update, 1.0), shapes)
    assert all(torch.equal(full[k], v.float()) for k, v in update.items())


def test_payload_bytes_are_measured_from_safetensors():
    update = {"w": torch.randn(100, 100, generator=torch.Generator().manual_seed(1))}  # int16 index
    payload = topk_compress(update, 0.01)  # k = 100
    blob = st_save(payload)
    data = 100 * (4 + 2)
    header = len(blob) - data
    print(f"top-k payload: {len(blob)} bytes = {data} data + {header} header; dense {len(st_save(update))} bytes")
    assert 0 < header <= 256
    assert len(st_save(update)) >= 40000
    # and it decodes back from the bytes
    back = topk_decompress(st_load(blob), {"w": (100, 100)})
    assert torch.count_nonzero(back["w"]) == 100


# ----------------------------------------------------------------------------- validation


def _good() -> dict[str, torch.Tensor]:
    return {"w/idx": torch.tensor([1, 4], dtype=torch.uint8), "w/val": _t(1.0, 2.0)}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: p.update({"v/idx": p["w/idx"]}), r"unknown key\(s\) \['v'\]"),
        (lambda p: p.update({"w/foo": p["w/idx"]}), "'w/foo' is not '<key>/<kind>'"),
        (lambda p: p.update({"noslash": p["w/idx"]}), "'noslash' is not '<key>/<kind>'"),
        (lambda p: p.pop("w/val"), r"needs idx and val, got \['idx'\]"),
        (lambda p: p.update({"w/dense": torch.zeros(6)}), "both dense and sparse entries for 'w'"),
        (lambda p: p.update({"w/idx": torch.tensor([1, 4], dtype=torch.int64)}), "w/idx must be 1-D torch.uint8"),
        (lambda p: p.update({"w/idx": torch.tensor([1, 6], dtype=torch.uint8)}), r"index outside \[0, 6\): 6"),
        (lambda p: p.update({"w/idx": torch.tensor([3, 3], dtype=torch.uint8)}), "duplicate indices"),
        (lambda p: p.update({"w/val": _t(1.0)}), "w: 2 indices but 1 values"),
        (lambda p: p.update({"w/val": torch.tensor([1.0, 2.0], dtype=torch.float64)}), "w/val must be 1-D float32"),
        (lambda p: p.update({"w/val": _t(1.0, float("nan"))}), "w/val holds NaN or infinite values"),
        (lambda p: p.update({"w/idx": torch.zeros(0, dtype=torch.uint8), "w/val": _t()}), "w: 0 entries for a tensor of 6"),
        (lambda p: p.clear(), "no entry for 'w'"),
    ],
)
def test_bad_payloads_name_the_key(mutate, message):
    payload = _good()
    mutate(payload)
    with pytest.raises(PayloadError, match=message):
        topk_decompress(payload, {"w": (2, 3)})


def test_bad_dense_payloads():
    with pytest.raises(PayloadError, match="w/dense must be 1-D float32 of 6 values"):
        topk_decompress({"w/dense": torch.zeros(5)}, {"w": (2, 3)})
    with pytest.raises(PayloadError, match="w/dense holds NaN"):
        topk_decompress({"w/dense": torch.full((6,), float("inf"))}, {"w": (2, 3)})
    with pytest.raises(PayloadError, match="sends 'w' raw where an update was expected"):
        topk_decompress({"w/raw": torch.zeros(2, 3)}, {"w": (2, 3)})


def test_compress_rejects_bad_input():
    with pytest.raises(ConfigError, match=r"`keep_ratio` must be in \(0, 1\], got 0.0"):
        topk_compress({"w": torch.ones(3)}, 0.0)
    with pytest.raises(ConfigError, match=r"`keep_ratio` must be in \(0, 1\], got 1.5"):
        topk_compress({"w": torch.ones(3)}, 1.5)
    with pytest.raises(ConfigError, match="compresses floating tensors; 'n' is torch.int64"):
        topk_compress({"n": torch.ones(3, dtype=torch.int64)}, 0.5)
    with pytest.raises(PayloadError, match="update tensor 'w' holds NaN"):
        topk_compress({"w": _t(1.0, float("nan"))}, 0.5)


# ----------------------------------------------------------------------------- upload and server decode


def test_compress_upload_and_decode_by_hand():
    received = {"w": _t(1.0, 1.0, 1.0, 1.0), "n": torch.tensor(5)}
    trained = {"w": _t(2.0, -3.0, 3.0, 1.5), "n": torch.tensor(9)}  # update 1, -4, 2, .5
    payload, residual = compress_upload(trained, received, 0.25)  # k = 1
    assert residual == {}
    assert payload["w/idx"].tolist() == [1] and payload["w/val"].tolist() == [-4.0]
    assert payload["n/raw"].item() == 9 and payload["n/raw"].dtype == torch.int64
    extras = {TOPK_PREFIX + k: v for k, v in payload.items()} | {"scaffold.dc/w": torch.zeros(4)}  # others ignored
    out = decode_topk_result(received, extras)
    assert out["w"].tolist() == [1.0, -3.0, 1.0, 1.0]
    assert out["n"].item() == 9 and out["n"].dtype == torch.int64


def test_error_feedback_by_hand():
    received = {"w": torch.zeros(4)}
    # round 1: update 1, -4, 2, .5 -> sends -4 at 1, keeps 1, 0, 2, .5
    p1, r1 = compress_upload({"w": _t(1.0, -4.0, 2.0, 0.5)}, received, 0.25, residual={})
    assert p1["w/idx"].tolist() == [1]
    assert r1["w"].tolist() == [1.0, 0.0, 2.0, 0.5]
    # round 2: update .5, .5, -.5, 0 + residual = 1.5, .5, 1.5, .5 -> tie -> index 0
    p2, r2 = compress_upload({"w": _t(0.5, 0.5, -0.5, 0.0)}, received, 0.25, residual=r1)
    assert p2["w/idx"].tolist() == [0] and p2["w/val"].tolist() == [1.5]
    assert r2["w"].tolist() == [0.0, 0.5, 1.5, 0.5]


def test_decode_rejects_bad_raw_and_missing_entries():
    received = {"w": torch.zeros(4), "n": torch.tensor(5)}
    good = {"topk/w/dense": torch.zeros(4), "topk/n/raw": torch.tensor(6)}
    assert decode_topk_result(received, good)["n"].item() == 6
    with pytest.raises(PayloadError, match="n/raw must have shape"):
        decode_topk_result(received, {**good, "topk/n/raw": torch.tensor(6, dtype=torch.int32)})
    with pytest.raises(PayloadError, match="'n' is torch.int64: it must be sent raw"):
        decode_topk_result(received, {"topk/w/dense": torch.zeros(4)})
    with pytest.raises(PayloadError, match="no entry for 'w'"):
        decode_topk_result(received, {"topk/n/raw": torch.tensor(6)})
    with pytest.raises(PayloadError, match="unknown key 'x'"):
        decode_topk_result(received, {**good, "topk/x/raw": torch.tensor(1)})


def test_keep_ratio_for_bandwidth():
    ref = 10e6
    assert keep_ratio_for_bandwidth(ref, reference=ref) == 1.0
    assert keep_ratio_for_bandwidth(ref / 4, reference=ref) == 0.25
    assert keep_ratio_for_bandwidth(ref / 1000, reference=ref) == 0.01  # clipped at min_keep
    assert keep_ratio_for_bandwidth(2 * ref, reference=ref) == 1.0  # clipped at max_keep
    assert keep_ratio_for_bandwidth(ref / 2, reference=ref, max_keep=0.5) == 0.25
    with pytest.raises(ConfigError, match="`reference` must be a positive finite number, got 0"):
        keep_ratio_for_bandwidth(1.0, reference=0)
    with pytest.raises(ConfigError, match="need 0 < min_keep <= max_keep <= 1"):
        keep_ratio_for_bandwidth(1.0, reference=1.0, min_keep=0.5, max_keep=0.2)
