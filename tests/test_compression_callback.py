"""TopKUploadCallback in real client runs: the result carries only the top-k update."""

from __future__ import annotations

import torch

from lightning_fedprune.callbacks.compression import RESIDUAL_STATE_KEY, TopKUploadCallback
from lightning_fedprune.core.client_store import ClientStore
from lightning_fedprune.core.compression import TOPK_PREFIX, decode_topk_result, topk_count
from lightning_fedprune.core.messages import ClientTask, decode_result, encode_result
from lightning_fedprune.runtime import ClientRuntime


def _sent(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.federated_state().items()}


def test_topk_upload_in_a_client_run(tiny_module, tiny_data):
    # Prepare: the same client trained twice, with and without the callback (same seeds)
    sent = _sent(tiny_module())
    task = ClientTask(round=0, client_id=1, weights=sent, local_epochs=2, config={"upload_keep_ratio": 0.1})
    compressed = ClientRuntime(tiny_module(), data=tiny_data, seed=3, callbacks=[TopKUploadCallback()]).run(task)
    plain = ClientRuntime(tiny_module(), data=tiny_data, seed=3).run(task)
    trained = plain.weights
    # Assert: nothing dense is sent, the payload is under topk/
    assert compressed.weights == {}
    assert compressed.config["upload"] == "topk"
    assert compressed.extras and all(k.startswith(TOPK_PREFIX) for k in compressed.extras)
    assert compressed.metrics.num_steps == plain.metrics.num_steps
    # the server rebuilds: trained values at the top-k positions of the update, sent values elsewhere
    rebuilt = decode_topk_result(sent, compressed.extras)
    assert set(rebuilt) == set(sent)
    for key, base in sent.items():
        if not base.is_floating_point():  # steps_seen travels raw
            assert torch.equal(rebuilt[key], trained[key]) and rebuilt[key].dtype == torch.int64
            assert rebuilt[key].item() == base.item() + plain.metrics.num_steps
            continue
        update = (trained[key] - base).reshape(-1)
        k = topk_count(update.numel(), 0.1)
        top = torch.zeros(update.numel(), dtype=torch.bool)
        top[update.abs().argsort(descending=True, stable=True)[:k]] = True
        top = top.reshape(base.shape)
        assert int(top.sum()) == k and k < base.numel()
        assert torch.allclose(rebuilt[key][top], trained[key][top], rtol=0, atol=1e-6)
        assert torch.equal(rebuilt[key][~top], base[~top])
        assert not torch.equal(trained[key][~top], base[~top])  # training changed them: they were really dropped
    # the result travels through the real codec, and is much smaller than the dense one
    blob = encode_result(compressed)
    again = decode_result(blob)
    assert all(torch.equal(again.extras[k], v) and again.extras[k].dtype == v.dtype for k, v in compressed.extras.items())
    dense_bytes = len(encode_result(plain))
    print(f"tiny net upload: {len(blob)} bytes top-k 0.1 vs {dense_bytes} bytes dense")
    assert len(blob) < dense_bytes


def test_without_a_keep_ratio_the_callback_does_nothing(tiny_module, tiny_data):
    sent = _sent(tiny_module())
    task = ClientTask(round=0, client_id=0, weights=sent)
    res = ClientRuntime(tiny_module(), data=tiny_data, seed=0, callbacks=[TopKUploadCallback()]).run(task)
    plain = ClientRuntime(tiny_module(), data=tiny_data, seed=0).run(task)
    assert res.extras == {} and "upload" not in res.config
    assert all(torch.equal(res.weights[k], plain.weights[k]) for k in plain.weights)


def test_error_feedback_keeps_what_was_not_sent_in_the_client_state(tiny_module, tiny_data):
    module = tiny_module()
    sent = _sent(module)
    runtime = ClientRuntime(module, data=tiny_data, seed=1, callbacks=[TopKUploadCallback()])
    store = ClientStore()
    config = {"upload_keep_ratio": 0.25, "upload_error_feedback": True}
    res0 = runtime.run(ClientTask(round=0, client_id=2, weights=sent, config=config), store)
    rebuilt0 = decode_topk_result(sent, res0.extras)
    residual0 = store.get(2)[RESIDUAL_STATE_KEY]
    plain0 = ClientRuntime(tiny_module(), data=tiny_data, seed=1).run(ClientTask(round=0, client_id=2, weights=sent))
    for key, base in sent.items():
        if not base.is_floating_point():
            assert key not in residual0
            continue
        # residual = update - what was sent: trained = rebuilt + residual
        assert torch.allclose(rebuilt0[key] + residual0[key], plain0.weights[key], atol=1e-6)
        assert torch.count_nonzero(residual0[key]) > 0
    # round 1 starts from the rebuilt weights; the residual is added to its update
    res1 = runtime.run(ClientTask(round=1, client_id=2, weights=rebuilt0, config=config), store)
    residual1 = store.get(2)[RESIDUAL_STATE_KEY]
    rebuilt1 = decode_topk_result(rebuilt0, res1.extras)
    plain1 = ClientRuntime(tiny_module(), data=tiny_data, seed=1).run(ClientTask(round=1, client_id=2, weights=rebuilt0))
    for key, base in rebuilt0.items():
        if base.is_floating_point():
            # sent + left over = this round's update + last round's residual
            assert torch.allclose(rebuilt1[key] - base + residual1[key], plain1.weights[key] - base + residual0[key], atol=1e-6)
    # a task without error feedback leaves the memory alone
    runtime.run(ClientTask(round=2, client_id=2, weights=rebuilt1, config={"upload_keep_ratio": 0.25}), store)
    kept = store.get(2)[RESIDUAL_STATE_KEY]
    assert all(torch.equal(kept[k], residual1[k]) for k in residual1)
