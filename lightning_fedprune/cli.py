"""Command line: ``python -m lightning_fedprune <command> ...`` (also ``lightning-fedprune``).

Commands::

    run  RECIPE.yaml [--set key=value ...] [--resume] [--quiet]   run a recipe in the simulator
    show RECIPE.yaml [--set key=value ...]                         print the resolved recipe as YAML
    list [strategies|wrappers|models|datasets|partitions|callbacks|loggers]   what a recipe can name

Deployment through FedML (CONFIG is a deployment config, see ``recipes/fedml/``)::

    server  CONFIG [--set ...] [--resume] [--quiet | --no-progress]   the server process (FedML rank 0)
    client  CONFIG --rank N [--set ...]                               the client process of rank N
    launch  CONFIG [--clients N] [--set ...] [--resume] [--quiet]     server + N clients (+ broker/store) here
    export-data CONFIG --rank N --out DIR                             the clients' own data, for an edge device
    package CONFIG --rank N --out DIR [--with-data]                   a client package made with `fedml build`
    serve   CONFIG --client-id C [--host H] [--port P]                serve a client's trained model (/ready, /predict)

``--set`` overrides any recipe key by its dotted path, e.g. ``--set strategy.name=fedprox
--set strategy.options.mu=0.01 --set rounds=5``; values are parsed as YAML. For deployment
configs, keys starting with a FedML section (``comm_args.backend=MQTT_S3``) set that section.

Exit codes: 0 success; 2 invalid recipe, data or model settings (one error message, no
traceback); 1 a round in which every client failed; 3 a peer, broker or object store could not be
reached (deployment commands); 130 interrupted (resume with ``--resume``).

Ctrl-C during ``run`` or ``server`` finishes the round in progress, writes the checkpoint and exits
with 130; a second Ctrl-C exits with 130 at once (the last checkpoint still resumes the run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_fedprune.errors import AllClientsFailedError, ConfigError, DataError, ModelError, RunInterrupted

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
    """The argument parser (``run``, ``show`` and the FedML deployment commands)."""
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

    lst = sub.add_parser(
        "list", help="list strategies (with options), wrappers, models, datasets, partitions, client callbacks, loggers",
        description="List what a recipe can name: strategies and wrappers with their options, models, datasets, "
        "partition schemes, client callbacks and loggers.",
    )
    lst.add_argument("topic", nargs="?", choices=LIST_TOPICS, help="one topic (default: all)")
    lst.set_defaults(func=_cmd_list)
    _add_deployment_commands(sub)
    return parser


def _add_deployment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="deployment config YAML, e.g. recipes/fedml/digits_grpc.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key (rounds=5) or a FedML section key (comm_args.backend=MQTT_S3); repeatable",
    )


def _add_deployment_commands(sub: Any) -> None:
    """``server``, ``client``, ``launch``, ``export-data``, ``package``, ``serve`` (FedML is imported lazily)."""
    server = sub.add_parser("server", help="run the server of a FedML deployment", description="Run the server (FedML rank 0).")
    _add_deployment_args(server)
    server.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint if there is one")
    server.add_argument("--quiet", action="store_true", help="no progress bar or summary table; warnings and errors only")
    server.add_argument("--no-progress", action="store_true", help="log lines only (no progress bar or summary table)")
    server.set_defaults(func=_cmd_server)

    client = sub.add_parser("client", help="run one client process of a FedML deployment", description="Run the client process of one rank.")
    _add_deployment_args(client)
    client.add_argument("--rank", type=int, required=True, help="this process's rank (1..device_args.worker_num)")
    client.add_argument("--quiet", action="store_true", help="warnings and errors only")
    client.set_defaults(func=_cmd_client)

    launch = sub.add_parser(
        "launch", help="run a FedML deployment on this machine",
        description="Start the server, the client processes and (MQTT_S3) a broker and object store on this machine.",
    )
    _add_deployment_args(launch)
    launch.add_argument("--clients", type=int, default=None, help="client processes (default: device_args.worker_num)")
    launch.add_argument("--resume", action="store_true", help="the server continues from the run folder's checkpoint")
    launch.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    launch.set_defaults(func=_cmd_launch)

    export = sub.add_parser(
        "export-data", help="write a client process's own data to a folder",
        description="Write the samples of the clients a rank serves (and nothing else) to a folder (data_args.data_cache_dir).",
    )
    _add_deployment_args(export)
    export.add_argument("--rank", type=int, required=True, help="the client process's rank")
    export.add_argument("--out", required=True, help="the folder to write")
    export.set_defaults(func=_cmd_export_data)

    package = sub.add_parser(
        "package", help="build a client package with `fedml build`",
        description="Build the client package of one rank with FedML's offline `fedml build`.",
    )
    _add_deployment_args(package)
    package.add_argument("--rank", type=int, required=True, help="the client process's rank")
    package.add_argument("--out", required=True, help="folder that receives dist-packages/client-package.zip")
    package.add_argument("--with-data", action="store_true", help="put the rank's own data into the package")
    package.set_defaults(func=_cmd_package)

    creds = sub.add_parser(
        "credentials", help="write a deployment's CA, certificates and message keys",
        description="Write a deployment's TLS CA, one certificate per rank (for the hosts in its GRPC ipconfig), "
        "the broker's and store's certificate and the message keys to a folder, readable by their owner only; "
        "prints the comm_args keys that use them.",
    )
    _add_deployment_args(creds)
    creds.add_argument("--out", required=True, help="the folder to write")
    creds.add_argument("--broker-host", action="append", default=[], metavar="HOST",
                       help="a host name or address of the MQTT broker and S3 store (repeatable)")
    creds.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    creds.set_defaults(func=_cmd_credentials)

    serve = sub.add_parser(
        "serve", help="serve a client's trained model over HTTP",
        description="Serve a client's trained (pruned, personalized) model with FedML's inference runner (/ready, /predict).",
    )
    _add_deployment_args(serve)
    serve.add_argument("--client-id", type=int, required=True, help="the client whose model to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=2345, help="port (default 2345, FedML's)")
    serve.set_defaults(func=_cmd_serve)


def _deployment(args: argparse.Namespace):
    from lightning_fedprune.fedml_adapters.commands import load_deployment
    from lightning_fedprune.fedml_adapters.transport import quiet_fedml_environment

    quiet_fedml_environment()  # before anything imports FedML's dependencies

    return load_deployment(args.config, args.overrides)


def _transport_errors(fn):
    """Exit code 3 with one message when a peer, the broker or the store cannot be reached."""

    def wrapped(args: argparse.Namespace) -> int:
        from lightning_fedprune.fedml_adapters.services import ServiceError
        from lightning_fedprune.fedml_adapters.transport import TransportError

        try:
            return fn(args)
        except (TransportError, ServiceError) as err:
            _error(str(err))
            return 3

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


@_transport_errors
def _cmd_server(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightning_fedprune.driver import exit_on_second_interrupt
    from lightning_fedprune.fedml_adapters.commands import plain_logging, run_server
    from lightning_fedprune.reporting import RichProgress

    exit_on_second_interrupt(130)
    cfg = _deployment(args)
    if args.quiet or args.no_progress:
        with plain_logging(quiet=args.quiet, prefix="[server] "):
            run_server(cfg, resume=args.resume, progress=None)
        return 0
    console = Console()
    with _RichLogging(console, False):
        run_server(cfg, resume=args.resume, progress=RichProgress(console=console))
    return 0


@_transport_errors
def _cmd_client(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import plain_logging, run_client

    cfg = _deployment(args)
    with plain_logging(quiet=args.quiet, prefix=f"[rank {args.rank}] "):
        run_client(cfg, args.rank)
    return 0


@_transport_errors
def _cmd_launch(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import run_launch

    cfg = _deployment(args)
    return run_launch(cfg, clients=args.clients, resume=args.resume, quiet=args.quiet)


def _cmd_export_data(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import run_export_data

    out = run_export_data(_deployment(args), args.rank, args.out)
    print(f"wrote the data of rank {args.rank} to {out}")
    return 0


def _cmd_package(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import plain_logging, run_package

    with plain_logging():
        out = run_package(_deployment(args), args.rank, args.out, with_data=args.with_data)
    print(f"client package of rank {args.rank}: {out}")
    return 0


def _cmd_credentials(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import run_credentials

    print(run_credentials(_deployment(args), args.out, broker_hosts=args.broker_host, days=args.days), end="")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from lightning_fedprune.fedml_adapters.commands import plain_logging, run_serve

    with plain_logging():
        run_serve(_deployment(args), args.client_id, host=args.host, port=args.port)
    return 0


#: the topics of ``list``
LIST_TOPICS = ("strategies", "wrappers", "models", "datasets", "partitions", "callbacks", "loggers")


def _plain(text: str) -> str:
    """Docstring text without reStructuredText roles and literal quotes."""
    import re

    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def _summary(obj: Any) -> str:
    import inspect

    return _plain(" ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split()))


def _options_line(options: dict[str, Any]) -> str:
    import inspect

    parts = []
    for name, (param, _hint) in options.items():
        ann = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", str(param.annotation))
        text = f"{name}: {ann}" if param.annotation is not inspect.Parameter.empty else name
        if param.default is not inspect.Parameter.empty:
            text += f" = {param.default!r}"
        parts.append(text)
    return ", ".join(parts) if parts else "(no options)"


def _options_line_names(names: list[str]) -> str:
    return ", ".join(names) if names else "(no options)"


def list_sections(topic: str | None = None) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """What ``list`` prints: ``[(section title, [(name, summary, options), ...]), ...]``."""
    from lightning_fedprune.callbacks import CLIENT_CALLBACKS
    from lightning_fedprune.data import available_datasets, dataset_description, partition_options
    from lightning_fedprune.data.partition import PARTITION_SCHEMES
    from lightning_fedprune.models import list_models, model_description
    from lightning_fedprune.reporting import LOGGERS, logger_options
    from lightning_fedprune.strategies import STRATEGIES, WRAPPERS, strategy_options, wrapper_options

    def partition_line(scheme: str) -> str:
        defaults, required = partition_options(scheme)
        parts = [f"{k} (required)" for k in required] + [f"{k} = {v!r}" for k, v in defaults.items()]
        return ", ".join(parts) if parts else "(no options)"

    out = {
        "strategies": ("Strategies (strategy.name; options under strategy.options)", [
            (n, _summary(STRATEGIES[n]), _options_line({k: v for k, v in strategy_options(n).items() if k != "seed"}))
            for n in sorted(STRATEGIES)
        ]),
        "wrappers": ("Strategy wrappers (strategy.wrappers: [{name: ..., options: {...}}], innermost first)", [
            (n, _summary(WRAPPERS[n]), _options_line(wrapper_options(n))) for n in sorted(WRAPPERS)
        ]),
        "models": ("Models (model.name, arguments under model.kwargs; also any timm:<name>)", [
            (n, _plain(model_description(n)), "") for n in list_models()
        ]),
        "datasets": ("Datasets (data.name; files under data.root)", [
            (n, _plain(dataset_description(n)), "") for n in available_datasets()
        ]),
        "partitions": ("Partitions (data.partition, options under data.partition_options)", [
            (n, "", partition_line(n)) for n in PARTITION_SCHEMES
        ]),
        "callbacks": ("Client callbacks (named by strategies and wrappers)", [
            (n, _summary(CLIENT_CALLBACKS[n]), "") for n in sorted(CLIENT_CALLBACKS)
        ]),
        "loggers": ("Loggers (loggers: [{name: ..., options: {...}}]; round metrics with step = round)", [
            (n, f"lightning.pytorch.loggers.{cls}", _options_line_names(logger_options(n))) for n, cls in LOGGERS.items()
        ]),
    }
    return [out[t] for t in ([topic] if topic else LIST_TOPICS)]


def _cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for title, rows in list_sections(args.topic):
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("what")
        for name, summary, options in rows:
            summary, options = escape(summary), escape(options)
            text = summary if not options else (f"{summary}\n[dim]{options}[/dim]" if summary else f"[dim]{options}[/dim]")
            table.add_row(name, text)
        console.print(table)
        console.print()
    return 0


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

    from lightning_fedprune.driver import exit_on_second_interrupt

    exit_on_second_interrupt(130)

    console = Console()
    with _RichLogging(console, args.quiet):
        return _run(args, console)


def _run(args: argparse.Namespace, console) -> int:
    from lightning_fedprune.reporting import MetricsWriter, PlotWriter, RichProgress
    from lightning_fedprune.simulation import CHECKPOINT_NAME, build_run

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
    except RunInterrupted as err:
        _error(f"{err}; continue the run with --resume")
        return 130
    except KeyboardInterrupt:
        _error("interrupted; continue the run with --resume")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
