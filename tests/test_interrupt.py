"""Ctrl-C: a real SIGINT stops a run after the round in progress with a consistent checkpoint,
the message and exit code 130; a second SIGINT stops at once, still with 130; the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lightning_fedprune.core.serialization import load_state

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
seed: 0
rounds: {rounds}
run_dir: {run_dir}
data: {{name: digits, num_clients: 4, partition: iid, batch_size: 20}}
model: {{name: mlp, kwargs: {{hidden: [32]}}, lr: 0.05}}
strategy: {{name: fedavg, local_epochs: 1}}
"""


def _sigint_default() -> None:
    # the run is started as from a terminal: a suite launched in the background by a shell without
    # job control inherits an ignored SIGINT, which the run (rightly) keeps ignoring
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(recipe: Path, *extra: str, quiet: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_fedprune", "run", str(recipe), *(["--quiet"] if quiet else []), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
    )


def _rounds_written(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)["round"])
        except (ValueError, KeyError):
            pass
    return out


def _wait_for_rounds(proc: subprocess.Popen, run_dir: Path, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while len(_rounds_written(run_dir)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run did not start"
        time.sleep(0.05)


def _check_consistent(run_dir: Path) -> int:
    state = load_state(run_dir / "checkpoint.safetensors")
    rounds = _rounds_written(run_dir)
    nxt = int(state["next_round"])
    assert [r["round"] for r in state["history"]] == list(range(nxt))
    assert rounds[:nxt] == list(range(nxt))  # the metric file holds every checkpointed round
    return nxt


def _interrupted_after_round_one(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A 500-round run, sent one SIGINT once its first round is written: (process, run dir, recipe)."""
    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(rounds=500, run_dir=run_dir))
    proc = _start(recipe)
    _wait_for_rounds(proc, run_dir, 1)
    proc.send_signal(signal.SIGINT)
    return proc, run_dir, recipe


def test_sigint_stops_after_the_round_with_a_checkpoint_and_exit_130_then_resumes(tmp_path):
    # 1. one SIGINT while round 1 runs: the round finishes, is checkpointed, exit 130
    proc, run_dir, recipe = _interrupted_after_round_one(tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted after round" in err and "continue the run with --resume" in err
    assert "Traceback" not in err
    first = _check_consistent(run_dir)
    assert first >= 1

    # 2. resumed, then two SIGINTs in a row a few rounds later: the second stops at once, still 130,
    # and the last checkpoint is intact
    proc = _start(recipe, "--resume")
    _wait_for_rounds(proc, run_dir, first + 3)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    nxt = _check_consistent(run_dir)
    assert nxt >= first + 2

    # 3. the run resumes from there and finishes; a default (not quiet) run prints no third-party warning
    recipe.write_text(RECIPE.format(rounds=nxt + 2, run_dir=run_dir))
    proc = _start(recipe, "--resume", quiet=False)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _rounds_written(run_dir) == list(range(nxt + 2))
    assert f"resuming at round {nxt}" in out
    assert "Warning" not in out + err and "warn" not in err, out + err


def test_ctrl_c_to_the_whole_process_group_with_overlapped_worker_rounds(tmp_path):
    # a terminal's Ctrl-C reaches the engine and its client workers alike; the round started ahead
    # is dropped, the checkpoint is that of the last round recorded, and the run resumes
    run_dir = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(rounds=500, run_dir=run_dir) + "engine: {workers: 2, overlap_eval: true}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_fedprune", "run", str(recipe), "--quiet"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_sigint_default,
    )
    _wait_for_rounds(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    nxt = _check_consistent(run_dir)
    assert nxt >= 2

    recipe.write_text(RECIPE.format(rounds=nxt + 2, run_dir=run_dir) + "engine: {workers: 2}\n")
    proc = _start(recipe, "--resume")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _rounds_written(run_dir) == list(range(nxt + 2))


def test_more_ctrl_c_while_an_interrupted_run_winds_down_exit_130_without_a_traceback(tmp_path):
    # After the first SIGINT the run stops after its round; SIGINTs that keep coming while the
    # process writes the checkpoint, returns and shuts the interpreter down (exit handlers
    # included) must still end it with 130 and no KeyboardInterrupt traceback.
    proc, run_dir, _ = _interrupted_after_round_one(tmp_path)
    time.sleep(0.3)  # the round ends and the run winds down meanwhile
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    out, err = proc.communicate(timeout=60)
    # 130, or killed by SIGINT itself when one lands after the interpreter restored the default
    # handler in its last step (a shell reports both as 130)
    assert proc.returncode in (130, -signal.SIGINT), err
    assert "Traceback" not in err
    _check_consistent(run_dir)
