"""Command line: ``python -m lightning_fedprune <command> ...`` (also ``lightning-fedprune``).

Commands::

    run  RECIPE.yaml [--set key=value ...] [--resume] [--quiet]   run a recipe in the simulator
    show RECIPE.yaml [--set key=value ...]                         print the resolved recipe as YAML

``--set`` overrides any recipe key by its dotted path, e.g. ``--set strategy.name=fedprox
--set strategy.options.mu=0.01 --set rounds=5``; values are parsed as YAML.

Exit codes: 0 success; 2 invalid recipe, data or model settings (one error message, no
traceback); 1 a round in which every client failed; 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_fedprune.errors import AllClientsFailedError, ConfigError, DataError, ModelError

log = logging.getLogger(__name__)

__all__ = ["main", "build_parser"]

PROG = "python -m lightning_fedprune"
#: errors caused by what the user wrote: exit code 2, message only
_USER_ERRORS = (ConfigError, DataError, ModelError)


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/digits_fedavg.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key by its dotted path (repeatable), e.g. --set strategy.name=fedprox",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands ``run`` and ``show``; ``server``/``client``/``launch`` are reserved for FedML)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Federated learning with model pruning on PyTorch Lightning."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run a recipe in the simulator", description="Run a recipe in the simulator.")
    _add_recipe_args(run)
    run.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint if there is one")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table; warnings and errors only")
    run.set_defaults(func=_cmd_run)

    show = sub.add_parser("show", help="print the resolved recipe as YAML", description="Print the resolved recipe as YAML.")
    _add_recipe_args(show)
    show.set_defaults(func=_cmd_show)
    # `server`, `client` and `launch` (FedML deployment) will be added here.
    return parser


def _load(args: argparse.Namespace):
    from lightning_fedprune.config import RecipeConfig

    return RecipeConfig.from_yaml(args.recipe).apply_overrides(args.overrides)


def _cmd_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    data = cfg.to_dict()
    data["run_dir"] = str(cfg.resolved_run_dir())
    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))
    return 0


class _RichLogging:
    """Route log records through ``console`` (the progress bar's) while a command runs, so they
    print above the bar; the logging setup is restored afterwards (``main`` may be called in-process)."""

    def __init__(self, console, quiet: bool) -> None:
        from rich.logging import RichHandler

        self.handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.level = logging.WARNING if quiet else logging.INFO

    def __enter__(self) -> None:
        root, pkg = logging.getLogger(), logging.getLogger("lightning_fedprune")
        self._saved = (root.level, pkg.level)
        root.addHandler(self.handler)
        pkg.setLevel(self.level)
        if root.level > self.level:
            root.setLevel(self.level)

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._saved[0])
        logging.getLogger("lightning_fedprune").setLevel(self._saved[1])


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    with _RichLogging(console, args.quiet):
        return _run(args, console)


def _run(args: argparse.Namespace, console) -> int:
    from lightning_fedprune.config import build_run
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter, RichProgress
    from lightning_fedprune.simulation import CHECKPOINT_NAME

    cfg = _load(args)
    run_dir = cfg.resolved_run_dir()
    listeners = [] if args.quiet else [RichProgress(console=console)]
    engine, rounds = build_run(cfg, listeners=[*listeners, MetricsWriter(run_dir), PlotWriter(run_dir)])
    if not args.resume and (run_dir / CHECKPOINT_NAME).exists():
        log.warning("%s holds an earlier run; starting afresh and overwriting it (add --resume to continue it)", run_dir)
    if args.resume:
        _warn_changed_config(run_dir / "config.yaml", cfg.to_dict())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    engine.run(rounds, resume=args.resume)
    return 0


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _warn_changed_config(saved_path: Path, current: dict[str, Any]) -> None:
    """Warn (once) when a resumed run's recipe differs from the one it started with."""
    import yaml

    if not saved_path.is_file():
        return
    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError):
        return
    now = _flatten(current)
    changed = sorted(k for k in set(saved) | set(now) if k != "rounds" and saved.get(k) != now.get(k))
    if changed:
        log.warning(
            "resuming with settings that differ from %s: %s; the checkpoint was made with the old ones",
            saved_path, ", ".join(changed),
        )


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse printed usage and the error
        return int(exit_.code or 0)
    try:
        return int(args.func(args))
    except _USER_ERRORS as err:
        _error(str(err))
        return 2
    except AllClientsFailedError as err:
        _error(str(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; continue the run with --resume")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
