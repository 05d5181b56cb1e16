"""Decoders of what peers send refuse malformed input with PayloadError only (a seeded fuzz run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_decoders.py"


def test_two_thousand_mutated_messages_never_crash_a_decoder():
    spec = importlib.util.spec_from_file_location("fuzz_decoders", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.fuzz(2000, seed=1) == {}


def test_the_harness_counts_a_crash(monkeypatch):
    spec = importlib.util.spec_from_file_location("fuzz_decoders_control", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def fragile(data):
        if len(data) % 2:
            raise ValueError("odd")

    monkeypatch.setitem(mod.DECODERS, "state", fragile)
    crashes = mod.fuzz(400, seed=1)
    assert sum(crashes.values()) > 0 and all(k[0] == "state" and k[1] == "ValueError" for k in crashes)
