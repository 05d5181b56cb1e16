"""Fixtures of the FedML tests (the helpers live in ``fedml_testing.py``)."""

from __future__ import annotations

import pytest
from fedml_testing import LoopbackHub


@pytest.fixture
def loopback() -> LoopbackHub:
    """An in-memory transport: endpoints of one process deliver envelopes through the real codec."""
    return LoopbackHub()
