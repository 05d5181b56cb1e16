"""A live GRPC endpoint's port cannot be taken over by a second process (no SO_REUSEPORT)."""

from __future__ import annotations

import subprocess
import sys

from fedml_testing import ROOT, grpc_deployment, need_fedml

SECOND = r"""
import sys
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig
from lightning_fedprune.fedml_adapters.transport import make_endpoint, TransportError
cfg = DeploymentConfig.from_yaml(sys.argv[1])
try:
    make_endpoint(cfg, 0).start(lambda env, wire: None, lambda reason: None)
except TransportError as err:
    print("REFUSED", err)
    sys.exit(0)
print("BOUND")
"""


def test_a_second_process_cannot_bind_a_live_grpc_port(tmp_path):
    need_fedml()
    from lightning_fedprune.fedml_adapters.transport import make_endpoint

    cfg, config, addresses = grpc_deployment(tmp_path)
    first = make_endpoint(cfg, 0)
    first.start(lambda env, wire: None, lambda reason: None)
    try:
        out = subprocess.run(
            [sys.executable, "-c", SECOND, str(config)], capture_output=True, text=True, timeout=120,
            env={"PYTHONPATH": str(ROOT), "PATH": ""},
        )
    finally:
        first.close()
    assert "REFUSED" in out.stdout and "port in use" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert str(addresses[0].port) in out.stdout
