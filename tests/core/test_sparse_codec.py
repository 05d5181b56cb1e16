"""The sparse payload codec: COO / masked-dense layouts, exact round trips, Eq. (2) bytes, bad input."""

from __future__ import annotations

import pytest
import torch

from lightning_fedprune.core.masks import MaskSet
from lightning_fedprune.core.messages import ClientTask, decode_task, encode_task
from lightning_fedprune.core.sparse import (
    COO_INDICES,
    COO_VALUES,
    MASK_BITS,
    coo_size_ratio,
    encoded_nbytes,
    index_bits,
    index_dtype_for,
    pack_bits,
    pack_state,
    payload_layout,
    payload_masks,
    unpack_bits,
    unpack_state,
    unpack_with_masks,
    use_coo,
)
from lightning_fedprune.errors import PayloadError


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def _random_masked(shape, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen)
    mask = torch.rand(*shape, generator=gen) < density
    mask.view(-1)[0] = True
    return w * mask, mask


# ----------------------------------------------------------------------------- layouts by hand


def test_coo_layout_by_hand():
    # Prepare: a 2x3 FC weight keeping (0,0), (0,2), (1,1); a bias
    w = torch.tensor([[1.5, 0.0, -2.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    state = {"fc.weight": w, "fc.bias": torch.tensor([0.1, 0.2])}
    # Execute: with b = 8 the COO form takes 3 * (2 + 4) = 18 bytes < 24 + 1 dense + mask
    packed = pack_state(state, {"fc.weight": mask})
    # Assert
    assert list(packed) == ["fc.weight" + COO_INDICES, "fc.weight" + COO_VALUES, "fc.bias"]
    idx = packed["fc.weight" + COO_INDICES]
    assert idx.dtype == torch.uint8 and idx.tolist() == [[0, 0, 1], [0, 2, 1]]
    assert packed["fc.weight" + COO_VALUES].tolist() == [1.5, -2.0, 3.0]
    assert payload_layout(packed) == {"fc.weight": "coo", "fc.bias": "dense"}
    full, masks = unpack_with_masks(packed, _shapes(state))
    assert torch.equal(full["fc.weight"], w) and torch.equal(full["fc.bias"], state["fc.bias"])
    assert torch.equal(masks["fc.weight"], mask)


def test_dense_when_smaller_conv_masked_and_full_masks_plain():
    # Prepare: an FC layer (b = 16) at 60% density (COO would be 1.2x dense), a conv layer, a layer kept whole
    fc, fc_mask = _random_masked((300, 50), 0.6)
    conv, conv_mask = _random_masked((4, 2, 3, 3), 0.3, seed=1)
    whole = torch.randn(3, 3)
    state = {"fc.weight": fc, "conv.weight": conv, "whole.weight": whole}
    masks = MaskSet({"fc.weight": fc_mask, "conv.weight": conv_mask, "whole.weight": torch.ones(3, 3, dtype=torch.bool)}, 2)
    # Execute
    packed = pack_state(state, masks)
    # Assert: dense + bit mask for the first two, plain dense for the unpruned one
    assert payload_layout(packed) == {"fc.weight": "masked", "conv.weight": "masked", "whole.weight": "dense"}
    assert packed["fc.weight" + MASK_BITS].dtype == torch.uint8 and packed["fc.weight" + MASK_BITS].numel() == 15000 // 8
    assert packed["conv.weight" + MASK_BITS].numel() == 9  # ceil(72 / 8)
    out = unpack_state(packed, _shapes(state))
    for k in state:
        assert torch.equal(out[k], state[k]), k
    assert set(payload_masks(packed, _shapes(state))) == {"fc.weight", "conv.weight"}
    # keys=() forbids COO even where it would be smaller
    sparse_fc, sparse_mask = _random_masked((40, 50), 0.05)
    assert payload_layout(pack_state({"w": sparse_fc}, {"w": sparse_mask}, keys=()))["w"] == "masked"
    assert payload_layout(pack_state({"w": sparse_fc}, {"w": sparse_mask}))["w"] == "coo"


def test_packed_tensors_are_copies():
    w, m = _random_masked((5, 6), 0.3)
    state = {"w": w, "b": torch.zeros(5)}
    packed = pack_state(state, {"w": m})
    packed["b"].add_(1.0)
    packed["w" + COO_VALUES].add_(1.0)
    assert state["b"].sum() == 0 and torch.equal(state["w"], w)


@pytest.mark.parametrize(
    "shape, dtype",
    [((10, 100), torch.uint8), ((256, 3), torch.uint8), ((257, 3), torch.int16), ((300, 784), torch.int16), ((40000, 2), torch.int32)],
)
def test_smallest_index_dtype(shape, dtype):
    assert index_dtype_for(shape) == dtype


def test_bit_packing_by_hand():
    m = torch.tensor([True, False, True, True, False, False, False, False, True])
    bits = pack_bits(m)
    assert bits.tolist() == [0b10110000, 0b10000000]
    assert torch.equal(unpack_bits(bits, 9), m)
    with pytest.raises(PayloadError, match="padding bits"):
        unpack_bits(torch.tensor([0b10110000, 0b11000000], dtype=torch.uint8), 9)


# ----------------------------------------------------------------------------- Eq. (2): measured bytes


@pytest.mark.parametrize("shape, density", [((300, 784), 0.05), ((300, 784), 0.2), ((300, 784), 0.45), ((200, 250), 0.3)])
def test_measured_payload_bytes_follow_eq_2(shape, density):
    # Prepare: one large FC layer at a given density
    w, mask = _random_masked(shape, density, seed=3)
    m, n = int(mask.sum()), mask.numel()
    bits = index_bits(index_dtype_for(shape))
    assert use_coo(shape, m)
    # Execute: really encode a task with the packed layer, and one with the dense layer
    sparse_blob = encode_task(ClientTask(round=0, client_id=0, weights=pack_state({"fc.weight": w}, {"fc.weight": mask}), config={"weights_format": "coo"}))
    dense_blob = encode_task(ClientTask(round=0, client_id=0, weights={"fc.weight": w}))
    # Assert: the ratio is (1 + b/16) * M/N within 1%
    expected = coo_size_ratio(m, n, bits)
    measured = len(sparse_blob) / len(dense_blob)
    assert measured == pytest.approx(expected, rel=0.01)
    assert encoded_nbytes(pack_state({"fc.weight": w}, {"fc.weight": mask})) / encoded_nbytes({"fc.weight": w}) == pytest.approx(expected, rel=0.01)
    # and the decoded message unpacks to the same tensor
    task = decode_task(sparse_blob)
    assert torch.equal(unpack_state(task.weights, {"fc.weight": shape})["fc.weight"], w)


def test_b16_break_even_is_about_half_density():
    # COO: 8 bytes per kept weight; masked dense: 4 bytes per weight + 1 bit of mask
    n = 300 * 784
    even = n * (4 + 1 / 8) / 8
    assert use_coo((300, 784), int(even) - 1)
    assert not use_coo((300, 784), int(even) + 1)
    # with b = 8 (both dimensions < 256) COO pays off up to (4 + 1/8) / 6 = 69% density
    assert use_coo((200, 250), int(50000 * 0.68)) and not use_coo((200, 250), int(50000 * 0.70))


# ----------------------------------------------------------------------------- malformed payloads


def _good():
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    conv = torch.zeros(2, 1, 2, 2)
    conv[0, 0, 0, 0] = 1.0
    cmask = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    cmask[0, 0, 0, 0] = True
    cmask[1, 0, 1, 1] = True
    state = {"fc.weight": w, "fc.bias": torch.zeros(2), "conv.weight": conv}
    return pack_state(state, {"fc.weight": mask, "conv.weight": cmask}), _shapes(state)


def _mutate(name, value):
    payload, shapes = _good()
    if value is None:
        del payload[name]
    else:
        payload[name] = value
    return payload, shapes


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("fc.weight::coo_indices", torch.tensor([[0, 1, 0], [0, 1, 2]], dtype=torch.uint8), r"'fc.weight::coo_indices' must be sorted row-major"),
        ("fc.weight::coo_indices", torch.tensor([[0, 0, 0], [0, 2, 2]], dtype=torch.uint8), r"sorted row-major without duplicates"),
        ("fc.weight::coo_indices", torch.tensor([[0, 0, 2], [0, 2, 1]], dtype=torch.uint8), r"indices outside the layer's shape \(2, 3\)"),
        ("fc.weight::coo_indices", torch.tensor([[0, 0, -1], [0, 2, 1]], dtype=torch.int16), r"indices outside"),
        ("fc.weight::coo_indices", torch.tensor([[0.0, 0, 1], [0, 2, 1]]), r"'fc.weight::coo_indices' must hold integers"),
        ("fc.weight::coo_indices", torch.tensor([0, 0, 1], dtype=torch.uint8), r"must have shape \(2, M\)"),
        ("fc.weight::coo_values", torch.tensor([1.0, 2.0]), r"'fc.weight::coo_values' must be a 1-D float tensor of 3 values"),
        ("fc.weight::coo_values", torch.tensor([1.0, float("nan"), 2.0]), r"'fc.weight::coo_values' holds NaN"),
        ("fc.weight::coo_values", None, r"COO tensor 'fc.weight' lacks 'fc.weight::coo_values'"),
        ("fc.weight", torch.zeros(2, 3), r"tensor 'fc.weight' is sent both as COO and dense"),
        ("fc.bias::scale", torch.zeros(1), r"'fc.bias::scale' has an unknown '::' suffix"),
        ("extra.weight", torch.zeros(1), r"tensors the model does not have: \['extra.weight'\]"),
        ("fc.bias", None, r"payload lacks tensors of the model: \['fc.bias'\]"),
        ("fc.bias", torch.zeros(3), r"tensor 'fc.bias' has shape \(3,\), the model expects \(2,\)"),
        ("conv.weight::mask", torch.tensor([128]), r"'conv.weight::mask' must be 1 uint8 bytes"),
        ("conv.weight::mask", torch.tensor([0, 0], dtype=torch.uint8), r"'conv.weight::mask' must be 1 uint8 bytes"),
        ("conv.weight::mask", torch.tensor([0], dtype=torch.uint8), r"'conv.weight::mask' keeps no weight"),
        ("conv.weight", torch.ones(2, 1, 2, 2), r"tensor 'conv.weight' has non-zero values at positions its mask prunes"),
        ("conv.weight", None, r"mask 'conv.weight::mask' comes without the values 'conv.weight'"),
    ],
)
def test_malformed_payloads_raise_payload_errors_naming_the_tensor(name, value, match):
    payload, shapes = _mutate(name, value)
    with pytest.raises(PayloadError, match=match):
        unpack_state(payload, shapes)


def test_coo_for_a_non_2d_tensor_and_padding_bits_are_rejected():
    payload, shapes = _good()
    shapes["fc.weight"] = (2, 3, 1)
    with pytest.raises(PayloadError, match=r"'fc.weight' arrives as COO but the model's tensor has shape \(2, 3, 1\)"):
        unpack_state(payload, shapes)
    w = torch.zeros(3, 3)
    w[0, 0] = 1.0
    m = torch.zeros(3, 3, dtype=torch.bool)
    m[0, 0] = True
    packed = pack_state({"w": w}, {"w": m}, keys=())
    packed["w::mask"] = torch.tensor([0b10000000, 0b01000000], dtype=torch.uint8)  # 9 entries: bit 10 is padding
    with pytest.raises(PayloadError, match=r"'w::mask': mask padding bits are set"):
        unpack_state(packed, {"w": (3, 3)})


def test_pack_rejects_masks_that_do_not_fit():
    with pytest.raises(PayloadError, match=r"mask of layer 'w' has shape \(2, 2\), the tensor \(2, 3\)"):
        pack_state({"w": torch.zeros(2, 3)}, {"w": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(PayloadError, match=r"mask of layer 'v' has no tensor"):
        pack_state({"w": torch.zeros(2, 3)}, {"v": torch.ones(2, 2, dtype=torch.bool)})
