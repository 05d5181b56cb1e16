"""Parallel clients: the plain sequential PyTorch loop vs the engine with 1 and N worker processes.

Workloads (the same data, seeds and initial weights on every side):
    (a) the 2-conv MNIST CNN of ``engine_overhead.py`` on 10 clients x 200 random 28x28 samples;
    (b) VGG-11-BN on the CIFAR-10 subset in ``../shared/data`` (10 clients x ``--vgg-samples``
        images, default 200: local training dominates a round, as in a real run, rather than the
        transfer of its 37 MB model; skipped when the data is absent).

For each workload: wall seconds per round (median over rounds after the first, which starts the
workers) of the plain sequential FedAvg loop, of the engine with 1 worker (this process) and
with 2, ... up to the usable cores, each with the evaluation of round t overlapping the training
of round t+1 (``engine.overlap_eval``, the default) and without; CPU seconds per round of this
process and its workers together (what a shared, loaded machine charges; wall times there are
noisy); the speed-up of N workers over 1 and over the plain loop; whether the final global models
of all engine runs are identical (they must be); the peak RSS of this process and of its workers;
``uptime`` before and after, since other processes share the cores. Where they do, wall times say
little; the *critical path* does (the round's wall time on idle cores, from CPU seconds), against
the plain loop's CPU seconds per round. The engine runs as a user runs it (``engine.run``), and
its critical path per round is counted per *cycle*, from the handling of one round's last result
to the next round's (each cycle holds one of each piece of the engine's work):

    critical path = serial + max(concurrent, busiest worker, (concurrent + all workers) / cores)

where ``concurrent`` is this process's CPU seconds from the moment the round's tasks are with the
workers to the moment it handles the round's last result (with the overlap: the previous round's
evaluation, record and checkpoint; without it, only the encoding of the tasks that charges their
bytes), ``serial`` the rest of this process's CPU seconds in the cycle (decoding results,
aggregating, configuring and sending the next round; the decoding of each result that comes while
other clients still train is concurrent), ``busiest worker`` / ``all workers`` the workers'
CPU seconds for the round, and ``cores`` the usable cores (this process evaluating beside two
busy workers on two cores shares them). Median over the cycles after the first. Also printed,
"nothing overlapped": this process's CPU seconds of the cycle plus the busiest worker's (the
figure before the overlap). With 1 worker: this process's CPU seconds per round.

With a CUDA device (``engine.accelerator: cuda``) the same workloads are also run on the GPU:
the engine with ``workers_per_gpu`` = 1, 2, 4 worker processes sharing each GPU, then the engine
with 1 worker in this process and the plain loop on the GPU (last, because CUDA initialized in
this process cannot be used by workers forked after it), with the largest difference of the
final model from the CPU run (floating-point order). The GPU path has not been measured here
(the machines at hand have no GPU): these figures print only where one is present.

The last line is machine-readable (from workload (a) on the CPU)::

    parallel_clients speedup_2=<x> vs_plain_2=<y> identical=<True|False>

Run: ``python benchmarks/parallel_clients.py [--rounds 4] [--max-workers N] [--vgg-samples 200]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_overhead import _Federated, plain_fedavg  # noqa: E402

from lightning_fedprune.data.federated import FederatedDataset  # noqa: E402
from lightning_fedprune.runtime import ClientRuntime  # noqa: E402
from lightning_fedprune.simulation import SimulationEngine, cuda_device_count, resolve_workers  # noqa: E402
from lightning_fedprune.strategies import FedAvg  # noqa: E402


def _peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (joined) children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _worker_cpu() -> dict[int, float]:
    """CPU seconds of each live child process (the engine's workers), from /proc (Linux; empty elsewhere)."""
    out = {}
    for child in mp.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[child.pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def _load() -> str:
    try:
        return "uptime: " + subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


class _Cycles:
    """Marks of one engine run, for its critical path (see :func:`engine_rounds`).

    A *cycle* ends when this process starts handling a round's last result (the workers answer
    client by client and ``collect`` hands each result over as it comes; where none is handed over,
    when ``collect`` starts): cycle ``r`` runs from there in round ``r - 1`` to there in round
    ``r``, and holds one of each piece of the engine's work whatever the order: decoding the last
    result of round ``r - 1`` and aggregating it, configuring and sending round ``r``, evaluating,
    recording and checkpointing round ``r - 1``, decoding round ``r``'s other results. Its
    *concurrent* part runs from the moment round ``r``'s tasks are with the workers (``submit``
    returned) to the end of the cycle: with the overlap this holds round ``r - 1``'s evaluation,
    record and checkpoint; without it, only the encoding of round ``r``'s tasks that charges their
    bytes; and the decoding of each result but the last while the workers train the others.
    """

    def __init__(self, engine: SimulationEngine) -> None:
        self.parent: list[float] = []  # this process's CPU seconds at each collect
        self.concurrent: list[float] = []  # ... of it, from submit's return to collect
        self.workers: list[list[float]] = []  # each worker's CPU seconds for the round
        self.wall: list[float] = []  # wall clock at each on_round_end
        executor = engine.transport.executor
        if executor is engine.transport.runtime:
            return
        submit, collect = executor.submit, executor.collect
        marks: dict[str, Any] = {}

        def _submit(tasks, store):
            marks["w0"] = _worker_cpu()
            submit(tasks, store)
            marks["p_sent"] = time.process_time()

        def _collect(store, **kwargs):
            p = time.process_time()
            on_result = kwargs.get("on_result")
            if on_result is not None:  # results handled as they come: the last one ends the cycle

                def _on_result(cid, blob):
                    marks["last"] = time.process_time()
                    on_result(cid, blob)

                kwargs["on_result"] = _on_result
            out = collect(store, **kwargs)
            end = marks.pop("last", p)
            self.parent.append(end)
            self.concurrent.append(end - marks.pop("p_sent", end))
            w0, w1 = marks.pop("w0", {}), _worker_cpu()
            self.workers.append([w1[pid] - w0.get(pid, 0.0) for pid in w1])
            return out

        executor.submit, executor.collect = _submit, _collect

    def on_round_end(self, record: dict) -> None:
        self.wall.append(time.perf_counter())

    def critical_paths(self, cores: int) -> tuple[list[float], list[float]]:
        """Per cycle after the first (which starts the workers): ``(summed, overlapped)`` critical paths.

        summed: this process's CPU seconds of the cycle plus the busiest worker's (nothing of this
        process overlaps the workers); overlapped: the serial part of this process's CPU seconds
        plus the longest of its concurrent part, the busiest worker, and the concurrent part plus
        all workers spread over ``cores`` (three busy processes on two cores share them).
        """
        summed, over = [], []
        for r in range(1, len(self.parent)):
            p = self.parent[r] - self.parent[r - 1]
            pc = self.concurrent[r]
            ws = self.workers[r] or [0.0]
            summed.append(p + max(ws))
            over.append((p - pc) + max(pc, max(ws), (pc + sum(ws)) / cores))
        return summed, over


@dataclass
class EngineRun:
    times: list[float]  # wall seconds per round (between round records)
    cpu: float  # CPU seconds per round, this process + workers, all rounds
    path_sum: float  # critical path per round, nothing overlapped (median over cycles after the first)
    path: float  # critical path per round with the concurrent part overlapped (same as path_sum with 1 worker)
    concurrent: float  # this process's CPU seconds per round while the workers train (median)
    final: dict


def engine_rounds(make_module, fd: FederatedDataset, *, rounds: int, seed: int, workers: int, accelerator: str = "cpu",
                  workers_per_gpu: int = 1, overlap: bool = True) -> EngineRun:
    """One engine run of ``rounds`` rounds (``engine.run``, as a user runs it), measured.

    Critical path of a round, from CPU seconds (what a shared, loaded machine cannot show as wall
    time): per cycle (see :class:`_Cycles`), ``serial + max(concurrent, busiest worker,
    (concurrent + all workers) / cores)``, where ``concurrent`` is this process's CPU seconds while
    the round's tasks are with the workers and ``serial`` the rest of its CPU seconds in the cycle;
    median over the cycles after the first. With 1 worker (clients trained in this process):
    this process's CPU seconds per round. ``path_sum`` counts nothing as overlapped (this
    process's CPU seconds plus the busiest worker's, the figure printed before the overlap).
    """
    module = make_module()
    cpu0 = _cpu_seconds()
    engine = SimulationEngine(
        strategy=FedAvg(seed=seed), runtime=ClientRuntime(module, data=fd, seed=seed, evaluate_local=False),
        data=fd, seed=seed, workers=workers, accelerator=accelerator, workers_per_gpu=workers_per_gpu,  # evaluates every round, as the plain loop does
        overlap_eval=overlap, listeners=[],
    )
    cycles = _Cycles(engine)
    engine.listeners.append(cycles)
    t0, p0 = time.perf_counter(), time.process_time()
    marks = []
    engine.listeners.append(types.SimpleNamespace(on_round_end=lambda record: marks.append(time.process_time())))
    try:
        engine.run(rounds)
    finally:
        engine.close()  # joins the workers: their CPU time is counted from here
    cpu = (_cpu_seconds() - cpu0) / rounds
    walls = [b - a for a, b in zip([t0, *cycles.wall], cycles.wall)]
    final = {k: v.detach().cpu().clone() for k, v in engine.strategy.global_state.items()}
    if not cycles.parent:  # clients trained in this process
        per_round = [b - a for a, b in zip([p0, *marks], marks)]
        return EngineRun(walls, cpu, _median(per_round), _median(per_round), 0.0, final)
    summed, over = cycles.critical_paths(_cores())
    return EngineRun(walls, cpu, statistics.median(summed), statistics.median(over), statistics.median(cycles.concurrent[1:]), final)


def _cores() -> int:
    return resolve_workers("auto")


def plain_rounds(make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, device: str = "cpu") -> tuple[float, float]:
    """Wall and CPU seconds per round of the plain loop."""
    model = copy.deepcopy(make_module().model)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    plain_fedavg(model, fd, rounds=rounds, lr=lr, seed=seed, device=device)
    return (time.perf_counter() - t0) / rounds, (_cpu_seconds() - c0) / rounds


def _median(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


def measure(name: str, make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, max_workers: int) -> dict:
    print(f"[{name}] {_load()}")
    plain, plain_cpu = plain_rounds(make_module, fd, rounds=rounds, lr=lr, seed=seed)
    runs: dict[str, EngineRun] = {}
    for w in range(1, max_workers + 1):
        if w > 1:
            runs[f"{w} workers, no overlap"] = engine_rounds(make_module, fd, rounds=rounds, seed=seed, workers=w, overlap=False)
        runs[f"{w} worker(s)" if w == 1 else f"{w} workers, overlapped"] = engine_rounds(make_module, fd, rounds=rounds, seed=seed, workers=w)
    first = next(iter(runs.values()))
    identical = all(all(torch.equal(run.final[k], v) for k, v in first.final.items()) for run in runs.values())
    print(f"[{name}] plain sequential loop: {plain:.3f} s/round  (cpu {plain_cpu:.3f} s/round)")
    t1 = _median(first.times)
    for label, run in runs.items():
        t = _median(run.times)
        print(f"[{name}] engine, {label}: {t:.3f} s/round wall ({t / plain:.2f}x the plain loop's wall; speed-up vs 1 worker {t1 / t:.2f}x); "
              f"cpu, this process + workers {run.cpu:.3f} s/round; critical path {run.path:.3f} s/round = {run.path / plain_cpu:.2f}x "
              f"the plain loop's cpu (nothing overlapped: {run.path_sum:.3f} = {run.path_sum / plain_cpu:.2f}x; "
              f"this process while the workers train: {run.concurrent:.3f} s/round)")
    print(f"[{name}] final models identical across worker counts and overlap: {identical}")
    print(f"[{name}] peak RSS: this process {_peak_mb(resource.RUSAGE_SELF):.0f} MB, largest worker {_peak_mb(resource.RUSAGE_CHILDREN):.0f} MB")
    print(f"[{name}] {_load()}")
    per_round = {1: t1}
    path = {1: first.path}
    for w in range(2, max_workers + 1):
        per_round[w] = _median(runs[f"{w} workers, overlapped"].times)
        path[w] = runs[f"{w} workers, overlapped"].path
    return {"plain": plain, "plain_cpu": plain_cpu, "per_round": per_round, "path": path, "identical": identical, "final": first.final}


def _gap(final: dict, cpu_final: dict) -> float:
    """The largest difference of a final model from the CPU run's (floating-point order on the GPU)."""
    return max(float((final[k] - v).abs().max()) for k, v in cpu_final.items() if v.is_floating_point())


def measure_gpu_workers(name: str, make_module, fd: FederatedDataset, *, rounds: int, seed: int, cpu_final: dict) -> None:
    """The engine's worker processes on CUDA, ``workers_per_gpu`` = 1, 2, 4 sharing each GPU."""
    gpus = cuda_device_count()
    print(f"[{name} / cuda] {gpus} GPU(s); {_load()}")
    for per_gpu in (1, 2, 4):
        workers = gpus * per_gpu
        if workers < 2:
            continue  # one worker trains in this process: measured last
        run = engine_rounds(make_module, fd, rounds=rounds, seed=seed, workers=workers, accelerator="cuda", workers_per_gpu=per_gpu)
        print(f"[{name} / cuda] engine, {workers} worker(s), {per_gpu} per GPU: {_median(run.times):.3f} s/round  "
              f"(cpu {run.cpu:.3f} s/round)  largest difference from the CPU run {_gap(run.final, cpu_final):.2e}")


def measure_gpu_here(name: str, make_module, fd: FederatedDataset, *, rounds: int, lr: float, seed: int, cpu_final: dict) -> None:
    """The engine with 1 worker in this process and the plain loop, both on the GPU (CUDA gets initialized here)."""
    run = engine_rounds(make_module, fd, rounds=rounds, seed=seed, workers=1, accelerator="cuda")
    print(f"[{name} / cuda] engine, 1 worker in this process: {_median(run.times):.3f} s/round  (cpu {run.cpu:.3f} s/round)  "
          f"largest difference from the CPU run {_gap(run.final, cpu_final):.2e}")
    plain, plain_cpu = plain_rounds(make_module, fd, rounds=rounds, lr=lr, seed=seed, device="cuda")
    print(f"[{name} / cuda] plain sequential loop on the GPU: {plain:.3f} s/round  (cpu {plain_cpu:.3f} s/round); {_load()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-workers", type=int, default=None, help="default: the usable cores")
    parser.add_argument("--vgg-samples", type=int, default=200, help="CIFAR images per client for VGG-11 (0 skips it)")
    parser.add_argument("--vgg-rounds", type=int, default=None, help="default: half of --rounds, at least 2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(val_dataloader|LeafSpec).*")
    max_workers = args.max_workers or max(2, resolve_workers("auto"))
    gpus = cuda_device_count()
    print(f"usable cores: {resolve_workers('auto')}; workers 1..{max_workers}; rounds {args.rounds}; CUDA devices: {gpus}")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2500, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (2500,), generator=g)
    fd_cnn = FederatedDataset(TensorDataset(x[:2000], y[:2000]), np.array_split(np.arange(2000), 10), test=TensorDataset(x[2000:], y[2000:]), batch_size=20)

    def make_cnn() -> _Federated:
        torch.manual_seed(args.seed)
        m = _Federated("cnn_mnist", lr=0.01)
        m.federated_example_input_shape = (1, 28, 28)
        return m

    workloads = [("cnn/random", make_cnn, fd_cnn, args.rounds)]
    if args.vgg_samples > 0:
        try:
            from lightning_fedprune.data import load_dataset

            splits = load_dataset("cifar10_subset")
        except Exception as err:  # no data here: say so and go on
            print(f"[vgg11/cifar10_subset] skipped: {err}")
        else:
            n = 10 * args.vgg_samples
            fd_vgg = FederatedDataset(splits.train, np.array_split(np.arange(n), 10), test=torch.utils.data.Subset(splits.test, range(200)), batch_size=20)

            def make_vgg() -> _Federated:
                torch.manual_seed(args.seed)
                m = _Federated("vgg11_bn", lr=0.01, num_classes=10)
                m.federated_example_input_shape = (3, 32, 32)
                return m

            workloads.append((f"vgg11/cifar10_subset x{args.vgg_samples}", make_vgg, fd_vgg, args.vgg_rounds or max(2, args.rounds // 2)))

    results = {}
    for name, make, fd, rounds in workloads:
        results[name] = measure(name, make, fd, rounds=rounds, lr=0.01, seed=args.seed, max_workers=max_workers)
    if gpus > 0:  # workers first: once this process has initialized CUDA, forked workers cannot use it
        for name, make, fd, rounds in workloads:
            measure_gpu_workers(name, make, fd, rounds=rounds, seed=args.seed, cpu_final=results[name]["final"])
        for name, make, fd, rounds in workloads:
            measure_gpu_here(name, make, fd, rounds=rounds, lr=0.01, seed=args.seed, cpu_final=results[name]["final"])
    else:
        print("no CUDA device: GPU figures skipped")

    cnn = results["cnn/random"]
    t1, t2 = cnn["per_round"][1], cnn["per_round"].get(2, cnn["per_round"][1])
    p2 = cnn["path"].get(2, cnn["path"][1])
    print(f"[cnn/random] critical path of 2 workers vs the plain loop's cpu: {p2 / cnn['plain_cpu']:.3f}x")
    print(f"parallel_clients speedup_2={t1 / t2:.3f} vs_plain_2={t2 / cnn['plain']:.3f} identical={cnn['identical']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
