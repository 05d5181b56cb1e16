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


_handler: logging.Handler | None = None


def _setup_logging(console, quiet: bool) -> None:
    """Route log records through ``console`` (the progress bar's), so they print above the bar."""
    global _handler
    from rich.logging import RichHandler

    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(_handler)
    level = logging.WARNING if quiet else logging.INFO
    logging.getLogger("lightning_fedprune").setLevel(level)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightning_fedprune.config import build_run
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter, RichProgress

    console = Console()
    _setup_logging(console, args.quiet)
    cfg = _load(args)
    run_dir = cfg.resolved_run_dir()
    listeners = [] if args.quiet else [RichProgress(console=console)]
    engine, rounds = build_run(cfg, listeners=[*listeners, MetricsWriter(run_dir), PlotWriter(run_dir)])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    engine.run(rounds, resume=args.resume)
    return 0


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
