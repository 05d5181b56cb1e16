"""Concurrent oversized messages: refused by GRPC with a logged reason, memory bounded and given back.

A GRPC endpoint with a small ``max_message_bytes`` runs in this process; a separate process (only
grpcio, no limits of its own, holding an enrolled client's TLS certificate) opens concurrent calls carrying messages of ten times the limit, then
concurrent messages just under the limit that are no valid envelope. This process's resident
memory is sampled throughout.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedml_testing import ROOT, grpc_deployment, need_fedml

LIMIT = 8 * 1024 * 1024
MIB = 1024 * 1024

#: sends N concurrent requests of SIZE bytes to FedML's GRPC method, as raw protobuf (grpcio only)
ATTACK = r"""
import sys, threading, grpc
host, port, n, size, creds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def varint(v):
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)
body = b"\x08\x01\x12" + varint(size) + b"\x7b" * size          # CommRequest(client_id=1, message=...)
read = lambda name: open(f"{creds}/{name}", "rb").read()  # an enrolled client's certificate (rank 1)
tls = grpc.ssl_channel_credentials(read("ca.pem"), read("rank_1.key"), read("rank_1.pem"))
channel = grpc.secure_channel(f"{host}:{port}", tls, options=[("grpc.max_send_message_length", 2**31 - 1)])
call = channel.unary_unary("/gRPCCommManager/sendMessage")
codes = []
def send():
    try:
        call(body, timeout=60, wait_for_ready=True)
        codes.append("OK")
    except grpc.RpcError as err:
        codes.append(err.code().name)
threads = [threading.Thread(target=send) for _ in range(n)]
[t.start() for t in threads]
[t.join() for t in threads]
print("CODES", " ".join(sorted(codes)), flush=True)
"""


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    def __init__(self) -> None:
        self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _attack(port: int, n: int, size: int, creds: Path) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", ATTACK, "127.0.0.1", str(port), str(n), str(size), str(creds)],
        capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("CODES ")]
    assert line, out.stdout[-2000:] + out.stderr[-2000:]
    return line[0].split()[1:]


def test_concurrent_oversized_messages_are_refused_and_memory_is_bounded_and_released(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.transport import GRPC_MAX_CONCURRENT_RPCS, make_endpoint

    cfg, _, addresses = grpc_deployment(tmp_path, f"comm_args.max_message_bytes={LIMIT}")
    got, refused = [], []
    ep = make_endpoint(cfg, 0)
    ep.start(lambda env, wire: got.append(env), refused.append)
    try:
        _attack(addresses[0].port, 8, 1000, tmp_path / "credentials")  # warm up: GRPC's worker threads and their malloc arenas
        time.sleep(0.3)
        base = _rss_mib()
        n, size = 8, 10 * LIMIT
        with RssSampler() as rss:
            codes = _attack(addresses[0].port, n, size, tmp_path / "credentials")
            deadline = time.monotonic() + 10
            while len(refused) < 8 + n and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(0.5)  # the transport gives memory back 0.2 s after a large message
        over_peak, over_after = rss.peak - base, _rss_mib() - base
        # just under the limit: GRPC takes them, our decoder refuses them (no envelope)
        with RssSampler() as rss:
            codes_in = _attack(addresses[0].port, n, LIMIT - 100, tmp_path / "credentials")
            deadline = time.monotonic() + 10
            while len(refused) < 8 + n + codes_in.count("OK") and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(0.5)
        in_peak, in_after = rss.peak - base, _rss_mib() - base
    finally:
        ep.close()
    print(
        f"{n} x {size / MIB:.0f} MiB: peak +{over_peak:.1f} MiB, after +{over_after:.1f} MiB; "
        f"{n} x {LIMIT / MIB:.1f} MiB: peak +{in_peak:.1f} MiB, after +{in_after:.1f} MiB"
    )
    assert got == []
    assert codes == ["RESOURCE_EXHAUSTED"] * n  # GRPC refused them before our code saw a byte
    # delivered to the transport, which refused them (or, past GRPC's concurrent-call limit, refused at once)
    assert codes_in.count("OK") >= GRPC_MAX_CONCURRENT_RPCS // 2 and set(codes_in) <= {"OK", "RESOURCE_EXHAUSTED"}
    too_big = [r for r in refused if "GRPC ended the call before a whole message arrived" in r]
    assert len(too_big) == n and all(f"limit of {LIMIT} bytes" in r for r in too_big)
    assert sum("not a lightning_fedprune envelope" in r for r in refused) == 8 + codes_in.count("OK")
    assert ep.stats["refused"] == len(refused) == 8 + n + codes_in.count("OK")
    total, limit = n * size / MIB, LIMIT / MIB  # 640 MiB were sent at once
    # measured (2 cores): oversized peak +28-125 MiB, after +3-7 MiB; under the limit (64 MiB at
    # once) peak +69-98 MiB, after +1-20 MiB (without malloc_trim after +37-48 MiB)
    assert over_peak < 0.3 * total and over_after < 3.5 * limit
    assert in_peak < 2 * GRPC_MAX_CONCURRENT_RPCS * limit and in_after < 3.5 * limit


def test_without_a_configured_limit_the_server_derives_one_from_its_model(tmp_path, loopback):
    from fedml_testing import RECIPES

    from lightning_fedprune.fedml_adapters.server import FedMLServer
    from lightning_fedprune.fedml_adapters.settings import DEFAULT_MAX_MESSAGE_BYTES, DeploymentConfig

    cfg = DeploymentConfig.from_yaml(
        RECIPES / "digits_grpc.yaml", overrides=[f"run_dir={tmp_path / 'run'}", "comm_args.max_message_bytes=null"]
    )
    assert cfg.comm_args.max_message_bytes is None and cfg.comm_args.message_limit == DEFAULT_MAX_MESSAGE_BYTES  # clients
    server = FedMLServer(cfg, endpoint=loopback.endpoint(0))
    model = sum(v.numel() * v.element_size() for v in server.strategy.global_state.values())
    assert model == 4 * (64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10)  # the digits MLP in float32
    assert server.cfg.comm_args.max_message_bytes == server.transport.cfg.comm_args.message_limit == 4 * model + MIB
    # a configured limit is kept
    kept = cfg.replace(comm_args=dataclasses.replace(cfg.comm_args, max_message_bytes=LIMIT))
    assert FedMLServer(kept, endpoint=None).cfg.comm_args.max_message_bytes == LIMIT
