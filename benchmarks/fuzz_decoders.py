"""Fuzz the decoders of everything a peer can send: mutated tasks, results, states and envelopes.

Every case starts from a valid message and mutates it (random bytes, truncation, insertions,
numbers too large for a float, 5,000-deep JSON nesting, NaN / 1e999, a forged safetensors header
length, forged dtypes and shapes). A decoder may accept a case or refuse it with the project's
``PayloadError``; anything else is a crash. The last line is machine-readable::

    fuzz_decoders cases=<n> crashes=<k>

Run: ``python benchmarks/fuzz_decoders.py [--cases 20000] [--seed 0]``
"""

from __future__ import annotations

import argparse
import collections
import random
import struct
import traceback

import torch

from lightning_fedprune.core.messages import ClientMetrics, ClientResult, ClientTask, decode_result, decode_task, encode_result, encode_task
from lightning_fedprune.core.serialization import dumps_state, loads_state
from lightning_fedprune.errors import PayloadError
from lightning_fedprune.fedml_adapters.envelope import Envelope, decode_envelope, encode_envelope


def samples() -> dict[str, bytes]:
    w = {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "n": torch.tensor(3)}
    task = ClientTask(round=2, client_id=1, weights=w, extras={"x": torch.ones(2)}, config={"prox_mu": 0.1, "kept": {"fingerprint": "ab", "kept": ["f"]}})
    res = ClientResult(round=2, client_id=1, weights=w, metrics=ClientMetrics(num_samples=10, num_steps=2, extra={"probe": 1.0}), extras={"y": torch.zeros(3)})
    out = {"task": encode_task(task), "result": encode_result(res), "state": dumps_state({"a": {"b": torch.ones(2)}, "c": [1, 2]})}
    out["envelope"] = encode_envelope(Envelope("result", 1, 0, "run", "sess", 3, body={"client_id": 1}, payload=out["result"]))
    return out


DECODERS = {"task": decode_task, "result": decode_result, "state": loads_state, "envelope": decode_envelope}


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
            DECODERS[name](mutate(base[name], rng))
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
