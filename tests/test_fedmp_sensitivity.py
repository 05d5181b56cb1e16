"""The FedMP sensitivity recipe: cells run in separate invocations keep their own tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "fedmp" / "sensitivity.py"
SMALL = ["--set", "data.name=digits", "--set", "model.name=mlp", "--target", "0.99"]


def _load():
    spec = importlib.util.spec_from_file_location("fedmp_sensitivity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cells_run_in_separate_invocations_keep_their_own_tables(tmp_path, capsys):
    mod = _load()
    out = tmp_path / "sens"
    one = ["--scenarios", "high", "--taus", "5", "--discounts", "0.995", "--thetas", "0.05", "--rounds", "2", "--out", str(out)]
    assert mod.main([*one, *SMALL]) == 0
    two = ["--scenarios", "low", "--taus", "5", "--discounts", "0.95", "0.99", "--thetas", "0.05", "--rounds", "2", "--out", str(out)]
    assert mod.main([*two, *SMALL]) == 0
    high = (out / "high_tau5" / "table.txt").read_text()
    low = (out / "low_tau5" / "table.txt").read_text()
    assert "high heterogeneity, tau=5, target 99%" in high
    assert "FedMP l=0.995 th=0.05: speed-up - (target not reached) (oracle - (target not reached))" in high
    assert "low heterogeneity, tau=5" in low and "FedMP l=0.95 th=0.05" in low and "FedMP l=0.99 th=0.05" in low
    assert "FedMP l=0.95" not in high  # the second invocation left the first cell's table alone
    assert (out / "table.txt").read_text() == low  # the invocation's own cells
    assert (out / "high_tau5" / "ratios_high_tau5.png").stat().st_size > 0
    # each FedMP variant reports its learned median ratio per cluster against the matched one
    assert "matched median ratio: A " in high and "rounds 0-1: A " in high
    # a rerun with --resume reuses the finished runs and writes the same table
    assert mod.main([*one, *SMALL, "--resume"]) == 0
    assert (out / "high_tau5" / "table.txt").read_text().split("\n")[-6:] == high.split("\n")[-6:]
    assert "speed-up" in capsys.readouterr().out
    # options of the FedMP variants alone are part of their labels (and run folders): the baselines
    # are reused, the plain variant's run is left alone, and round 0 of the new one trains unpruned
    assert mod.main([*one, *SMALL, "--resume", "--fedmp-set", "strategy.options.start_low=true"]) == 0
    table = (out / "high_tau5" / "table.txt").read_text()
    assert "FedMP l=0.995 th=0.05 start_low=true: speed-up" in table
    first = json.loads((out / "high_tau5" / "FedMP_l_0.995_th_0.05_start_low_true" / "metrics.jsonl").read_text().splitlines()[0])
    assert {k: v for k, v in first.items() if k.startswith("agg/ratio/")} == {f"agg/ratio/{c}": 0.0 for c in range(10)}
