"""E-UCB replayed against FedMP's simulated round times, without training (seconds per setting).

Each worker's round time at each ratio comes from the recipe's devices and model
(:func:`lightning_fedprune.experiments.round_time_table`: the CNN on MNIST, FedMP's scenarios).
The loss decrease is synthetic: ``base(k) * (1 - 0.5 ratio) * (1 + noise * z)``, ``z ~ N(0, 1)``,
``base(k) = 0.5 exp(-k / 40) + 0.02`` (with ``noise = 3`` about 37% of the values are negative,
close to the 40-47% measured late in training with 5 local steps). The loss after local work
(for ``progress="final_loss"``) is ``(1 + s(k) ratio) (1 + 0.22 z')``, ``s(k)`` rising linearly
from 0.17 at round 0 to 1.35 at round 60 and constant after: the relative slope and residual
spread measured on CNN/MNIST (High, seed 0) in rounds 0-49 and 50-99. Rounds follow the
recipe's round rules (deadline: 1.5 d at 85% of arrivals, late workers penalized and benched for
a round; or sync). No model is trained, so the figures are round times only: the mean round
time against Syn-FL's (every worker with the full model, the slowest ends the round) and the
oracle's (matched ratios), and the median ratio per cluster over the last half against the
matched ones. Use it to see how the bandit's settings move its decisions; the time to accuracy
comes from ``benchmarks/fedmp_time_to_target.py``.

    python benchmarks/fedmp_bandit_replay.py [--scenario high] [--seeds 0 1 2] [--rounds 200] [--tau 5]

The last line is machine-readable: ``fedmp_bandit_replay best=<setting> round_time_speedup=<median>``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_fedprune.config import RecipeConfig  # noqa: E402
from lightning_fedprune.core.bandit import EUCB  # noqa: E402
from lightning_fedprune.core.devices import fedmp_device_specs  # noqa: E402
from lightning_fedprune.core.rounds import RoundRules  # noqa: E402
from lightning_fedprune.experiments import match_ratios, round_time_table  # noqa: E402

#: label -> (round mode, E-UCB options)
PRINTED = dict(reward="printed", progress="loss_decrease", inherit=False)
SETTINGS = {
    "printed, auto, l=0.95, sync (the paper's settings)": ("sync", dict(PRINTED, exploration="auto", discount=0.95)),
    "printed, auto, l=0.95, deadline": ("deadline", dict(PRINTED, exploration="auto", discount=0.95)),
    "printed, auto, l=0.99, deadline": ("deadline", dict(PRINTED, exploration="auto", discount=0.99)),
    "bounded dL, auto, l=0.99, deadline (the previous recipes)": (
        "deadline", dict(reward="bounded", progress="loss_decrease", inherit=False, exploration="auto", discount=0.99)),
    "bounded, 1.0, l=0.995, deadline": ("deadline", dict(reward="bounded", progress="final_loss", inherit=True, exploration=1.0, discount=0.995)),
    "bounded, 0.05, l=0.95, deadline": ("deadline", dict(reward="bounded", progress="final_loss", inherit=True, exploration=0.05, discount=0.95)),
    "bounded, 0.05, l=0.99, deadline": ("deadline", dict(reward="bounded", progress="final_loss", inherit=True, exploration=0.05, discount=0.99)),
    "bounded, 0.05, l=0.995, deadline, no inherit": (
        "deadline", dict(reward="bounded", progress="final_loss", inherit=False, exploration=0.05, discount=0.995)),
    "bounded, 0.05, l=0.995, sync": ("sync", dict(reward="bounded", progress="final_loss", inherit=True, exploration=0.05, discount=0.995)),
    "bounded, 0.05, l=0.995, deadline (the recipes)": (
        "deadline", dict(reward="bounded", progress="final_loss", inherit=True, exploration=0.05, discount=0.995)),
}


def replay(grid, seconds, *, mode: str, options: dict, seed: int, rounds: int, noise: float) -> tuple[list[float], dict[int, list[float]]]:
    """Round times and each worker's ratios of one replay."""
    rules = RoundRules(mode=mode)
    bandit = EUCB(seed=seed, **options)
    rng = np.random.default_rng(seed)
    workers = range(len(seconds))
    benched: dict[int, int] = {}
    step = grid[1] - grid[0]
    round_times: list[float] = []
    ratios: dict[int, list[float]] = {c: [] for c in workers}

    def time_of(c: int, r: float) -> float:
        return seconds[c][min(int(r / step + 1e-9), len(grid) - 1)]

    for k in range(rounds):
        chosen = bandit.decide(k, rules.eligible(list(workers), k, benched=benched, busy=set()))
        times = {c: time_of(c, r) for c, r in chosen.items()}
        on_time, late, round_seconds, _ = rules.close(times, len(chosen))
        base = 0.5 * math.exp(-k / 40) + 0.02
        slope = 0.17 + (1.35 - 0.17) * min(k, 60) / 60
        outcomes = {c: (base * (1 - 0.5 * chosen[c]) * (1 + noise * float(rng.standard_normal())), times[c]) for c in on_time}
        finals = {c: max((1 + slope * chosen[c]) * (1 + 0.22 * float(rng.standard_normal())), 0.01) for c in on_time}
        bandit.observe(k, outcomes, final_losses=finals)
        bandit.penalize(k, late, 0.0)
        for c in late:
            benched[c] = rules.bench_until(k)
        round_times.append(round_seconds)
        for c, r in chosen.items():
            ratios[c].append(r)
    return round_times, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="high", choices=["low", "medium", "high"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--tau", type=int, default=5, help="local steps per round")
    parser.add_argument("--noise", type=float, default=3.0, help="relative noise of the synthetic loss decrease")
    args = parser.parse_args(argv)
    base = RecipeConfig.from_yaml(ROOT / "recipes" / "fedmp" / "cnn_mnist.yaml")
    speedups: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for seed in args.seeds:
        cfg = base.apply_overrides([f"seed={seed}", f"devices.scenario={args.scenario}", f"strategy.local_steps={args.tau}"])
        grid, seconds = round_time_table(cfg)
        clusters: dict[str, list[int]] = {}
        for d in fedmp_device_specs(args.scenario, seed=seed):
            clusters.setdefault(d.cluster, []).append(d.client)
        matched = match_ratios(grid, seconds)
        syn_rt = max(row[0] for row in seconds)
        oracle_rt = max(seconds[c][grid.index(r)] for c, r in matched.items())
        med_matched = {k: statistics.median(matched[c] for c in v) for k, v in clusters.items()}
        print(f"seed {seed}, {args.scenario}, tau={args.tau}: Syn-FL round {syn_rt:.3f} s, oracle round {oracle_rt:.3f} s "
              f"({syn_rt / oracle_rt:.2f}x); matched medians " + ", ".join(f"{k} {v:.2f}" for k, v in med_matched.items()))
        for label, (mode, options) in SETTINGS.items():
            times, ratios = replay(grid, seconds, mode=mode, options=options, seed=seed, rounds=args.rounds, noise=args.noise)
            half = args.rounds // 2
            learned = {k: statistics.median(r for c in v for r in ratios[c][half:]) for k, v in clusters.items()}
            s = syn_rt / statistics.mean(times)
            speedups[label].append(s)
            print(f"  {label:48s} mean round {statistics.mean(times):.3f} s ({s:.2f}x Syn-FL, {s / (syn_rt / oracle_rt):.0%} of the oracle); "
                  "medians of the last half " + ", ".join(f"{k} {v:.2f} ({v - med_matched[k]:+.2f})" for k, v in learned.items()))
    med = {k: statistics.median(v) for k, v in speedups.items()}
    best = max(med, key=med.get)
    print(f"fedmp_bandit_replay best={best.split(' (')[0].replace(' ', '')} round_time_speedup={med[best]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
