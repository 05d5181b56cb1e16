"""The wire format of ClientTask / ClientResult: round trips, validation and no code execution."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from lightning_fedprune.core.messages import (
    MESSAGE_VERSION,
    ClientMetrics,
    ClientResult,
    ClientTask,
    decode_result,
    decode_task,
    decode_weights,
    encode_result,
    encode_task,
    encode_weights,
    tensor_spec,
)
from lightning_fedprune.errors import PayloadError


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "body.weight": torch.randn(3, 4, generator=gen),
        "body.bias": torch.randn(3, generator=gen).to(torch.float64),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "half": torch.randn(2, 2, generator=gen).to(torch.float16),
        "mask": torch.tensor([True, False, True]),
    }


def _task(**overrides) -> ClientTask:
    kwargs = dict(
        round=3,
        client_id=5,
        weights=_weights(),
        local_epochs=2,
        extras={"scaffold.c/body.weight": torch.full((3, 4), 0.25)},
        config={"prox_mu": 0.01, "plan": {"body": [0, 2]}, "name": "x"},
    )
    kwargs.update(overrides)
    return ClientTask(**kwargs)


def _result(**overrides) -> ClientResult:
    kwargs = dict(
        round=3,
        client_id=5,
        weights=_weights(),
        metrics=ClientMetrics(
            num_samples=40,
            num_steps=8,
            num_examples=80,
            loss_before=float("nan"),
            loss_after=0.5,
            compute_seconds=0.125,
            flops=1.5e6,
            extra={"local_test_acc": 0.75, "odd": float("inf")},
        ),
        extras={"scaffold.dc/body.weight": torch.full((3, 4), -1.0)},
        config={"kept": [1, 2, 3]},
    )
    kwargs.update(overrides)
    return ClientResult(**kwargs)


def _assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _craft(header_text: str | None, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A safetensors blob with arbitrary message metadata (what a malicious peer could send)."""
    tensors = tensors if tensors is not None else {"weights/w": torch.zeros(2)}
    meta = {"lfp_message": header_text} if header_text is not None else None
    return st_save(tensors, metadata=meta)


def _result_header(**overrides) -> str:
    header = {
        "kind": "result",
        "version": MESSAGE_VERSION,
        "round": 0,
        "client_id": 0,
        "metrics": {"num_samples": 1, "num_steps": 1},
        "config": {},
    }
    header.update(overrides)
    return json.dumps(header)


# ----------------------------------------------------------------------------- round trips


def test_task_round_trip_keeps_tensors_dtypes_and_config():
    # Prepare
    task = _task()
    # Execute
    out = decode_task(encode_task(task), expect_round=3, expect_client=5)
    # Assert
    _assert_tensors_equal(out.weights, task.weights)
    _assert_tensors_equal(out.extras, task.extras)
    assert out.weights["bn.num_batches_tracked"].dtype == torch.int64
    assert out.weights["bn.num_batches_tracked"].item() == 7
    assert out.config == task.config
    assert (out.round, out.client_id, out.local_epochs, out.local_steps) == (3, 5, 2, None)


def test_task_round_trip_with_local_steps():
    task = _task(local_epochs=None, local_steps=11)
    out = decode_task(encode_task(task))
    assert (out.local_epochs, out.local_steps) == (None, 11)


def test_result_round_trip_keeps_tensors_metrics_and_nan_loss():
    # Prepare
    result = _result()
    # Execute
    out = decode_result(
        encode_result(result),
        expect_round=3,
        expect_client=5,
        expect_weights=tensor_spec(result.weights),
        expect_extras=tensor_spec(result.extras),
    )
    # Assert
    _assert_tensors_equal(out.weights, result.weights)
    _assert_tensors_equal(out.extras, result.extras)
    assert out.config == {"kept": [1, 2, 3]}
    m = out.metrics
    assert (m.num_samples, m.num_steps, m.num_examples) == (40, 8, 80)
    assert math.isnan(m.loss_before)
    assert m.loss_after == 0.5
    assert m.compute_seconds == 0.125
    assert m.flops == 1.5e6
    assert m.extra["local_test_acc"] == 0.75
    assert m.extra["odd"] == float("inf")


def test_sliced_view_is_encoded_without_its_base_storage():
    # Prepare
    big = torch.arange(100_000, dtype=torch.float32)
    small = torch.arange(10, dtype=torch.float32)
    # Execute
    view_bytes = encode_task(_task(weights={"w": big[:10]}, extras={}, config={}))
    ref_bytes = encode_task(_task(weights={"w": small.clone()}, extras={}, config={}))
    offset_view_bytes = encode_task(_task(weights={"w": big[500:510]}, extras={}, config={}))
    # Assert
    assert len(view_bytes) == len(ref_bytes)
    assert len(offset_view_bytes) == len(ref_bytes)
    assert len(view_bytes) < 1000  # 100k floats would be 400 kB
    assert torch.equal(decode_task(offset_view_bytes).weights["w"], big[500:510])


def test_non_contiguous_tensor_round_trips():
    t = torch.arange(12.0).reshape(3, 4).t()  # transposed view
    out = decode_task(encode_task(_task(weights={"w": t}, extras={}))).weights["w"]
    assert torch.equal(out, t)


# ----------------------------------------------------------------------------- rejections


def test_task_bytes_are_not_a_result():
    with pytest.raises(PayloadError, match="expected a result message, got kind='task'"):
        decode_result(encode_task(_task()))


def test_result_bytes_are_not_a_task():
    with pytest.raises(PayloadError, match="expected a task message, got kind='result'"):
        decode_task(encode_result(_result()))


def test_wrong_round_is_rejected():
    with pytest.raises(PayloadError, match="result is for round 3, expected round 4"):
        decode_result(encode_result(_result()), expect_round=4)


def test_wrong_client_is_rejected():
    with pytest.raises(PayloadError, match="from/for client 5, expected client 6"):
        decode_result(encode_result(_result()), expect_client=6)
    with pytest.raises(PayloadError, match="expected client 6"):
        decode_task(encode_task(_task()), expect_client=6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_is_rejected(bad):
    w = _weights()
    w["body.weight"][1, 2] = bad
    with pytest.raises(PayloadError, match="'weights/body.weight' holds NaN or infinite values"):
        decode_result(encode_result(_result(weights=w)))


def test_non_finite_extras_are_rejected():
    extras = {"scaffold.dc/body.weight": torch.tensor([1.0, float("nan")])}
    with pytest.raises(PayloadError, match="extras/scaffold.dc/body.weight"):
        decode_result(encode_result(_result(extras=extras)))


def test_shape_mismatch_against_expected_weights():
    spec = tensor_spec(_weights())
    w = _weights()
    w["body.weight"] = torch.zeros(3, 5)
    with pytest.raises(PayloadError, match=r"'body.weight' has shape \(3, 5\).*expected \(3, 4\)"):
        decode_result(encode_result(_result(weights=w)), expect_weights=spec)


def test_dtype_mismatch_against_expected_weights():
    spec = tensor_spec(_weights())
    w = _weights()
    w["bn.num_batches_tracked"] = torch.tensor(7, dtype=torch.int32)
    with pytest.raises(PayloadError, match=r"'bn.num_batches_tracked'.*torch.int32.*expected.*torch.int64"):
        decode_result(encode_result(_result(weights=w)), expect_weights=spec)


def test_missing_key_is_rejected():
    spec = tensor_spec(_weights())
    w = _weights()
    del w["body.bias"]
    with pytest.raises(PayloadError, match=r"weights do not match.*missing \['body.bias'\], unexpected \[\]"):
        decode_result(encode_result(_result(weights=w)), expect_weights=spec)


def test_unexpected_key_is_rejected():
    spec = tensor_spec(_weights())
    w = {**_weights(), "intruder": torch.zeros(1)}
    with pytest.raises(PayloadError, match=r"missing \[\], unexpected \['intruder'\]"):
        decode_result(encode_result(_result(weights=w)), expect_weights=spec)


def test_unexpected_extras_are_rejected():
    with pytest.raises(PayloadError, match=r"extras do not match.*unexpected \['scaffold.dc/body.weight'\]"):
        decode_result(encode_result(_result()), expect_extras={})


def test_oversized_payload_is_rejected():
    blob = encode_result(_result())
    assert decode_result(blob, max_bytes=len(blob)).client_id == 5  # exactly at the limit is fine
    with pytest.raises(PayloadError, match=f"result payload of {len(blob)} bytes exceeds the limit of {len(blob) - 1} bytes"):
        decode_result(blob, max_bytes=len(blob) - 1)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"abc",
        b"\x00" * 7,
        bytes(range(64)),
        b"\xff" * 8 + b"{}",
        struct.pack("<Q", 0) + b"{}",
        struct.pack("<Q", 8) + b"not json",
        struct.pack("<Q", 2) + b"[]",  # JSON, but not an object
        struct.pack("<Q", 4) + b'"ab"',
    ],
)
def test_garbage_bytes_are_rejected(garbage):
    with pytest.raises(PayloadError, match="safetensors header|too short"):
        decode_result(garbage)


def test_non_bytes_input_is_rejected():
    with pytest.raises(PayloadError, match="must be bytes, got str"):
        decode_result("hello")  # type: ignore[arg-type]


def test_tensor_outside_weights_and_extras_is_rejected():
    blob = _craft(_result_header(), {"weights/w": torch.zeros(2), "secret/w": torch.zeros(2)})
    with pytest.raises(PayloadError, match="tensor 'secret/w' outside weights/ and extras/"):
        decode_result(blob)


def test_header_that_is_not_json_is_rejected():
    with pytest.raises(PayloadError, match="message header is not JSON"):
        decode_result(_craft("{not json"))


def test_header_that_is_not_an_object_is_rejected():
    with pytest.raises(PayloadError, match="not a JSON object"):
        decode_result(_craft("[1, 2]"))


def test_safetensors_without_message_header_is_rejected():
    with pytest.raises(PayloadError, match="no 'lfp_message' header"):
        decode_result(_craft(None))


def test_unsupported_version_is_rejected():
    with pytest.raises(PayloadError, match="message version 99 is not supported"):
        decode_result(_craft(_result_header(version=99)))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("round", -1, "round must be >= 0, got -1"),
        ("round", "3", "round must be an integer"),
        ("client_id", True, "client_id must be an integer"),
    ],
)
def test_bad_header_fields_are_rejected(field, value, message):
    with pytest.raises(PayloadError, match=message):
        decode_result(_craft(_result_header(**{field: value})))


def test_negative_metric_is_rejected():
    header = _result_header(metrics={"num_samples": 1, "num_steps": 1, "flops": -5.0})
    with pytest.raises(PayloadError, match="flops must be a finite number >= 0.0, got -5.0"):
        decode_result(_craft(header))


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"flops": None}, "flops must be a finite number >= 0.0, got null"),
        ({"compute_seconds": None}, "compute_seconds must be a finite number >= 0.0, got null"),
        ({"extra": {"probe": 10**400}}, "extra.probe is too large for a float \\(401 digits\\)"),
        ({"extra": {"probe": {"__float__": 10**400}}}, "extra.probe must be a number"),
        ({"num_samples": 10**400}, "num_samples must be at most 2\\*\\*53 in size, got a 401-digit number"),
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
    ],
)
def test_hostile_metric_values_are_refused(metrics, message):
    header = _result_header(metrics={"num_samples": 1, "num_steps": 1, **metrics})
    with pytest.raises(PayloadError, match=message):
        decode_result(_craft(header))


def test_missing_metric_field_is_rejected():
    header = _result_header(metrics={"num_steps": 1})
    with pytest.raises(PayloadError, match="metrics lack the field 'num_samples'"):
        decode_result(_craft(header))


def test_task_needs_exactly_one_kind_of_local_work():
    with pytest.raises(PayloadError, match="exactly one of local_epochs / local_steps"):
        _task(local_epochs=2, local_steps=3)
    with pytest.raises(PayloadError, match="local work must be a positive int, got 0"):
        _task(local_epochs=0)


class _Exploit:
    """Unpickling this object runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payload_is_rejected_without_running_code(tmp_path, protocol):
    # Prepare: a pickle whose loading would create the marker file
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker), protocol=protocol)
    # sanity: the payload IS dangerous when unpickled (proves the test could fail)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(probe), protocol=protocol))
    assert probe.exists()
    # Execute / Assert
    with pytest.raises(PayloadError):
        decode_result(payload)
    with pytest.raises(PayloadError):
        decode_task(payload)
    assert not marker.exists()


def test_torch_save_payload_is_rejected_without_running_code(tmp_path):
    import io

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"weights": _Exploit(marker)}, buf)
    with pytest.raises(PayloadError):
        decode_result(buf.getvalue())
    assert not marker.exists()


def _raw_safetensors(header: object) -> bytes:
    """Bytes with a hand-written safetensors header (no tensors), bypassing the library's checks."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def test_message_header_value_that_is_not_a_string_is_rejected():
    blob = _raw_safetensors({"__metadata__": {"lfp_message": 5}})
    with pytest.raises(PayloadError, match="message header is not text, got int"):
        decode_result(blob)


def test_safetensors_metadata_that_is_not_a_mapping_is_rejected():
    blob = _raw_safetensors({"__metadata__": [1, 2]})
    with pytest.raises(PayloadError, match="__metadata__ is not a mapping"):
        decode_task(blob)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"extra": [1, 2]}, "metrics.extra must be a JSON object, got list"),
        ({"extra": "ab"}, "metrics.extra must be a JSON object, got str"),
        ({"extra": {"acc": "high"}}, "extra.acc must be a number, got 'high'"),
        ({"loss_before": {"__float__": "abc"}}, "loss_before must be a number"),
        ({"loss_after": {"__float__": None}}, "loss_after must be a number"),
        ({"num_examples": None}, "num_examples must be an integer, got None"),
        ({"num_steps": 1.0}, "num_steps must be an integer, got 1.0"),
    ],
)
def test_malformed_metrics_are_rejected(metrics, message):
    header = _result_header(metrics={"num_samples": 1, "num_steps": 1, **metrics})
    with pytest.raises(PayloadError, match=message):
        decode_result(_craft(header))


def test_metrics_that_are_not_an_object_are_rejected():
    with pytest.raises(PayloadError, match="metrics must be a JSON object, got NoneType"):
        decode_result(_craft(_result_header(metrics=None)))


def test_malformed_task_header_is_rejected():
    header = {"kind": "task", "version": MESSAGE_VERSION, "round": 0, "client_id": 0, "local_epochs": "2", "config": {}}
    with pytest.raises(PayloadError, match="local work must be a positive int, got '2'"):
        decode_task(_craft(json.dumps(header)))
    with pytest.raises(PayloadError, match="config must be a JSON object, got list"):
        decode_task(_craft(json.dumps({**header, "local_epochs": 1, "config": []})))


def test_unsupported_dtype_is_rejected():
    blob = _craft(_result_header(), {"weights/w": torch.zeros(2, dtype=torch.float8_e4m3fn)})
    with pytest.raises(PayloadError, match="'weights/w' has unsupported dtype torch.float8_e4m3fn"):
        decode_result(blob)


def test_tensor_with_empty_name_is_rejected():
    with pytest.raises(PayloadError, match="a tensor with an empty name"):
        decode_result(_craft(_result_header(), {"weights/": torch.zeros(1)}))


@pytest.mark.parametrize(
    "header, match",
    [
        ("[" * 5000 + "]" * 5000, "message header nests deeper than 64 levels"),
        ('{"kind": "result", "x": ' + "[" * 65 + "]" * 65 + "}", "message header nests deeper than 64 levels"),
        ('{"a": "' + "[" * 5000 + '"}', "expected a result message"),  # brackets inside a string are text
    ],
)
def test_deeply_nested_headers_are_refused_before_parsing(header, match):
    blob = _raw_safetensors({"__metadata__": {"lfp_message": header}})
    with pytest.raises(PayloadError, match=match):
        decode_result(blob)


def test_shared_weights_round_trip_alone_and_are_validated_like_a_tasks():
    w = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.float64)}
    got = decode_weights(encode_weights(w))
    assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) and got[k].dtype == w[k].dtype for k in w)
    with pytest.raises(PayloadError, match="weights tensor 'weights/b' holds NaN"):
        decode_weights(encode_weights({"b": torch.tensor([1.0, math.nan])}))
    with pytest.raises(PayloadError, match="expected a weights message, got kind='task'"):
        decode_weights(encode_task(ClientTask(round=0, client_id=0, weights=w)))
    with pytest.raises(PayloadError, match="exceeds the limit of 10 bytes"):
        decode_weights(encode_weights(w), max_bytes=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_by_hand(dtype):
    from lightning_fedprune.core.messages import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.tensor([1.0, -2.0, 3.5], dtype=dtype))
    assert all_finite(torch.zeros(0, dtype=dtype))
    # finite elements whose sum overflows are finite: the exact check settles it
    assert all_finite(torch.tensor([big, big, big], dtype=dtype))
    assert all_finite(torch.tensor([-big, -big], dtype=dtype))
    for bad in ([1.0, math.nan], [math.inf, 1.0], [-math.inf, 2.0], [math.inf, -math.inf], [big, math.nan, -big]):
        assert not all_finite(torch.tensor(bad, dtype=dtype)), bad


def test_finite_values_whose_sum_overflows_are_accepted():
    w = _weights()
    w["body.weight"].fill_(3.0e38)
    res = decode_result(encode_result(_result(weights=w)))
    assert torch.equal(res.weights["body.weight"], w["body.weight"])
