"""Fuzz the decoders of everything a peer can send: mutated tasks, results, states and envelopes.

Every case starts from a valid message and mutates it: either its bytes (random bytes,
truncation, insertions, numbers too large for a float, NaN / 1e999, a forged safetensors header
length, forged dtypes and shapes), or one value of one of its JSON documents (the envelope
header, the safetensors header, the message header or state skeleton inside it), re-framed with
correct lengths so the decoder really parses it: 5,000-deep nesting, 10**400, 1e999, NaN, null,
wrong types. A decoder may accept a case or refuse it with the project's ``PayloadError``;
anything else is a crash. The last line is machine-readable::

    fuzz_decoders cases=<n> crashes=<k>

Run: ``python benchmarks/fuzz_decoders.py [--cases 20000] [--seed 0]``
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import struct
import traceback

import torch

from lightning_fedprune.core.messages import ClientMetrics, ClientResult, ClientTask, decode_result, decode_task, encode_result, encode_task
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.errors import PayloadError
from lightning_fedprune.fedml_adapters.envelope import ENVELOPE_VERSION, MAGIC, Envelope, decode_envelope, encode_envelope

#: values a JSON document's value is replaced with (tokens json.dumps cannot write are spliced in)
HOSTILE = ["__DEEP__", "__HUGE_FLOAT__", "__NAN__", 10**400, -(10**400), None, -1, 0, 2**63, "x", [], {}, True, 1.5, [[[]]]]
_SPLICE = {'"__DEEP__"': "[" * 5000 + "]" * 5000, '"__HUGE_FLOAT__"': "1e999", '"__NAN__"': "NaN"}


def samples() -> dict[str, bytes]:
    w = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "n": torch.tensor(3)}
    task = ClientTask(round=2, client_id=1, weights=w, extras={"x": torch.ones(2)}, config={"prox_mu": 0.1, "kept": {"fingerprint": "ab", "kept": ["f"]}})
    res = ClientResult(round=2, client_id=1, weights=w, metrics=ClientMetrics(num_samples=10, num_steps=2, extra={"probe": 1.0}), extras={"y": torch.zeros(3)})
    out = {"task": encode_task(task), "result": encode_result(res), "state": dumps_state({"a": {"b": torch.ones(2)}, "c": [1, 2]})}
    out["envelope"] = encode_envelope(Envelope("result", 1, 0, "run", "sess", 3, body={"client_id": 1}, payload=out["result"]))
    return out


DECODERS = {"task": decode_task, "result": decode_result, "state": loads_state, "envelope": decode_envelope}


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def mutate_json(text: str, rng: random.Random) -> str:
    """``text`` (a JSON document) with one value, or the whole document, replaced by a hostile one."""
    doc = json.loads(text)
    path = rng.choice(list(_paths(doc)))
    value = rng.choice(HOSTILE)
    if not path:
        doc = value
    else:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    out = json.dumps(doc)
    for placeholder, token in _SPLICE.items():
        out = out.replace(placeholder, token)
    return out


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _safetensors(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw + body


def reframe(name: str, data: bytes, rng: random.Random) -> bytes:
    """A structural mutation: one JSON document of the message changed, all lengths still right."""
    if name == "envelope":
        prefix = len(MAGIC) + 1 + 4
        n = int.from_bytes(data[len(MAGIC) + 1 : prefix], "big")
        text, payload = data[prefix : prefix + n].decode("utf-8"), data[prefix + n :]
        if rng.random() < 0.5:  # the envelope's own header
            raw = mutate_json(text, rng).encode("utf-8")
            return MAGIC + bytes([ENVELOPE_VERSION]) + len(raw).to_bytes(4, "big") + raw + payload
        inner = reframe("result", payload, rng)  # the message it carries
        header = json.loads(text)
        header["payload_bytes"] = len(inner)
        raw = json.dumps(header).encode("utf-8")
        return MAGIC + bytes([ENVELOPE_VERSION]) + len(raw).to_bytes(4, "big") + raw + inner
    header, body = _safetensors_parts(data)
    if rng.random() < 0.3:  # the safetensors header itself
        return _safetensors(mutate_json(json.dumps(header), rng), body)
    meta = header.get("__metadata__") or {}
    key = next(iter(meta))  # the message header / state skeleton
    meta[key] = mutate_json(meta[key], rng)
    return _safetensors(json.dumps(header), body)


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(8)
    if kind == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif kind == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:
        s = bytes(b)
        j = s.find(b'"round"')
        if j >= 0:
            b = bytearray(s[:j] + b'"round": 1' + b"0" * 500 + s[j + 9:])
    elif kind == 4:
        s = bytes(b)
        j = s.find(b'{"')
        if j >= 0:
            b = bytearray(s[:j] + b"[" * 5000 + s[j:])
    elif kind == 5:
        b = bytearray(bytes(b).replace(b"1.0", b"NaN", 1).replace(b"0.1", b"1e999", 1))
    elif kind == 6 and len(b) >= 8:
        b[0:8] = struct.pack("<Q", rng.choice([0, 1, 2**63 - 1, len(b), len(b) * 2]))
    else:
        s = bytes(b).replace(b'"F32"', rng.choice([b'"F64"', b'"I8"', b'"BOOL"', b'"XX"']), 1)
        b = bytearray(s.replace(b"[4,3]", rng.choice([b"[3,4]", b"[-1,3]", b"[99999999999,3]", b"[]"]), 1))
    return bytes(b)


def fuzz(cases: int, seed: int) -> collections.Counter:
    rng = random.Random(seed)
    base = samples()
    crashes: collections.Counter = collections.Counter()
    for _ in range(cases):
        name = rng.choice(list(DECODERS))
        try:
            case = reframe(name, base[name], rng) if rng.random() < 0.5 else mutate(base[name], rng)
        except Exception as err:  # the harness itself: not a decoder crash
            raise RuntimeError(f"could not build a {name} case: {err}") from err
        try:
            DECODERS[name](case)
        except PayloadError:
            pass
        except Exception as err:  # a crash: anything but the project's refusal
            where = traceback.extract_tb(err.__traceback__)[-1]
            crashes[(name, type(err).__name__, f"{where.filename}:{where.lineno}")] += 1
    return crashes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    crashes = fuzz(args.cases, args.seed)
    for key, n in crashes.most_common():
        print(n, *key)
    print(f"fuzz_decoders cases={args.cases} crashes={sum(crashes.values())}")


if __name__ == "__main__":
    main()
