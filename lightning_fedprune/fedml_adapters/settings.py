"""Deployment configs: FedML's ``fedml_config.yaml`` sections around one of our recipes.

A deployment config says *how* a recipe runs for real; the recipe (the same YAML the simulator
runs) says *what* runs: data, model, strategy, seeds. Section and key names follow FedML's
``fedml_config.yaml`` where FedML has one (``common_args.run_id``, ``train_args.comm_round``,
``comm_args.backend``, ``comm_args.grpc_ipconfig_path``, ``customized_training_mqtt_config``,
``device_args.worker_num``, ``data_args.data_cache_dir`` ...)::

    recipe: ../digits_fedavg.yaml        # path relative to this file, or an inline mapping
    recipe_overrides: [rounds=3]         # optional, like `--set` of `run`
    common_args: {training_type: cross_silo, run_id: digits, random_seed: 0}
    data_args:   {data_cache_dir: null}  # a client's own data folder (see `export-data`)
    train_args:  {comm_round: 3, round_timeout_s: 600, startup_timeout_s: 300}
    device_args: {worker_num: 3}         # client processes (rank 1..worker_num)
    comm_args:
      backend: GRPC                      # or MQTT_S3
      grpc_ipconfig_path: null           # null: 127.0.0.1, port grpc_base_port + rank
      customized_training_mqtt_config: {BROKER_HOST: 127.0.0.1, BROKER_PORT: 1883}
      customized_training_s3_config: {CN_S3_ENDPOINT: "http://127.0.0.1:5000", BUCKET_NAME: fedprune,
                                      CN_S3_AKI: test, CN_S3_SAK: test, CN_REGION_NAME: us-east-1}
    tracking_args: {log_file_dir: null}  # process logs (default: <run_dir>/logs)

FedML keys that overlap the recipe override it when set: ``common_args.random_seed`` ->
``seed``, ``train_args.comm_round`` -> ``rounds``, ``train_args.client_num_in_total`` ->
``data.num_clients``.

Client ``c`` is served by the process of rank ``1 + c % worker_num``; with ``worker_num`` equal to
the number of clients (the default) every process serves one client.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_fedprune.config import RecipeConfig
from lightning_fedprune.config.schema import coerce, parse_section, unknown_key
from lightning_fedprune.errors import ConfigError

__all__ = [
    "write_auth_keys",
    "DeploymentConfig",
    "CommonArgs",
    "DataArgs",
    "TrainArgs",
    "DeviceArgs",
    "CommArgs",
    "TlsArgs",
    "TlsFiles",
    "TrackingArgs",
    "BACKENDS",
    "SECTIONS",
    "GrpcAddress",
    "read_grpc_ipconfig",
    "write_grpc_ipconfig",
]

BACKENDS = ("GRPC", "MQTT_S3")
SECTIONS = ("common_args", "data_args", "train_args", "device_args", "comm_args", "tracking_args")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MQTT_KEYS = ("BROKER_HOST", "BROKER_PORT")
S3_KEYS = ("CN_S3_ENDPOINT", "CN_S3_AKI", "CN_S3_SAK", "BUCKET_NAME")


@dataclass
class CommonArgs:
    """FedML's ``common_args``.

    Attributes:
        training_type: ``cross_silo`` (GRPC between a few long-lived processes) or
            ``cross_device`` (MQTT_S3 between many devices); informational, the backend decides.
        run_id: names the run on the wire (MQTT topics, S3 keys); default: the recipe's name.
        random_seed: overrides the recipe's ``seed`` when set.
    """

    training_type: str = "cross_silo"
    run_id: str | None = None
    random_seed: int | None = None


@dataclass
class DataArgs:
    """FedML's ``data_args``.

    Attributes:
        data_cache_dir: a client's own data folder written by ``export-data`` (only that client's
            samples); ``null`` loads the recipe's dataset and takes the client's partition.
    """

    data_cache_dir: str | None = None


@dataclass
class TrainArgs:
    """FedML's ``train_args`` plus the deployment's timing.

    Attributes:
        comm_round: overrides the recipe's ``rounds`` when set.
        client_num_in_total: overrides the recipe's ``data.num_clients`` when set.
        round_timeout_s: a selected client that has not delivered this many seconds after its
            task was sent is dropped from the round (failure kind ``deadline``).
        startup_timeout_s: how long the server waits for all client processes before round 0
            (then it starts with those that said hello; at least one is needed).
    """

    comm_round: int | None = None
    client_num_in_total: int | None = None
    round_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0


@dataclass
class DeviceArgs:
    """FedML's ``device_args``.

    Attributes:
        worker_num: client processes (ranks 1..worker_num); default: one per client.
        max_idle_s: a client process gives up (exit code 3) after this many seconds without a
            word from a server (``null``: it waits for a server for ever, like a device service).
    """

    worker_num: int | None = None
    max_idle_s: float | None = None


@dataclass
class TlsArgs:
    """``comm_args.tls``: TLS for GRPC and MQTT, and the certificates' identities.

    Paths are relative to the config file; ``{rank}`` in a path is replaced by the process's
    rank, so one config can serve every process of a one-machine run
    (:func:`~lightning_fedprune.fedml_adapters.credentials.write_credentials` writes the files).

    Attributes:
        ca_file: the deployment's CA certificate (PEM): every peer's, the broker's and the
            store's certificate must be signed by it.
        cert_file: this process's certificate (PEM), common name ``lfp-rank-<rank>``.
        key_file: its private key (PEM).
        mutual: GRPC servers require a client certificate from the CA and check that its rank is
            the rank a request claims.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mutual: bool = True


@dataclass(frozen=True)
class TlsFiles:
    """The TLS material of one process, read from ``comm_args.tls`` (PEM bytes and their paths)."""

    ca: bytes
    cert: bytes
    key: bytes
    ca_path: Path
    cert_path: Path
    key_path: Path
    mutual: bool


@dataclass
class CommArgs:
    """FedML's ``comm_args``.

    Attributes:
        backend: ``GRPC`` or ``MQTT_S3``.
        grpc_ipconfig_path: FedML's CSV ``eid,rank,grpc_server_ip,grpc_server_port,ingress_ip``
            (relative to the config file); ``null`` generates 127.0.0.1 with port
            ``grpc_base_port + rank``.
        grpc_base_port: base of the generated ports (FedML's default 8890).
        customized_training_mqtt_config: ``BROKER_HOST``, ``BROKER_PORT`` (and optional
            ``MQTT_USER``, ``MQTT_PWD``, ``MQTT_KEEPALIVE``) of the MQTT broker; ``launch`` starts a
            local mosquitto when empty.
        customized_training_s3_config: ``CN_S3_ENDPOINT``, ``CN_S3_AKI``, ``CN_S3_SAK``,
            ``BUCKET_NAME`` (and ``CN_REGION_NAME``) of the S3-compatible store; ``launch``
            starts a local moto server when empty.
        max_message_bytes: larger messages are refused (and logged) by the receiver. ``null``: the
            server derives it from its model (:func:`derived_message_limit`); clients take
            :data:`DEFAULT_MAX_MESSAGE_BYTES` (see :attr:`message_limit`).
        mqtt_inline_bytes: MQTT_S3 messages up to this size travel inside the MQTT message; larger
            ones go through the object store.
        send_timeout_s: one send (GRPC call, S3 upload) gives up after this long.
        connect_timeout_s: how long a process waits for a peer or the broker to come up.
        hello_interval_s: a client repeats its hello this often until the server answers.
        auth_key_file: authenticate every message (HMAC-SHA256 per client channel, counters against
            replay; :class:`~lightning_fedprune.fedml_adapters.envelope.Authenticator`): a JSON
            file ``{"master": "<64 hex>"}`` (the server, or every process of a one-machine run)
            or ``{"rank": r, "key": "<64 hex>"}`` (a client holding only its own key); relative to
            the config file; written by :func:`write_auth_keys`. Required unless ``insecure``.
        tls: :class:`TlsArgs`; required unless ``insecure``.
        insecure: ``true`` runs without TLS and without message authentication (a warning says
            so): only for a closed network you trust.
    """

    backend: str = "GRPC"
    grpc_ipconfig_path: str | None = None
    grpc_base_port: int = 8890
    customized_training_mqtt_config: dict[str, Any] = field(default_factory=dict)
    customized_training_s3_config: dict[str, Any] = field(default_factory=dict)
    max_message_bytes: int | None = None
    mqtt_inline_bytes: int = 16 * 1024
    send_timeout_s: float = 60.0
    connect_timeout_s: float = 300.0
    hello_interval_s: float = 2.0
    auth_key_file: str | None = None
    tls: TlsArgs = field(default_factory=TlsArgs)
    insecure: bool = False

    @property
    def message_limit(self) -> int:
        """``max_message_bytes``, or :data:`DEFAULT_MAX_MESSAGE_BYTES` when it is not set."""
        return int(self.max_message_bytes) if self.max_message_bytes is not None else DEFAULT_MAX_MESSAGE_BYTES


#: what a process accepts when ``comm_args.max_message_bytes`` is not set and it has no model to derive a limit from
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def derived_message_limit(global_state: Mapping[str, Any]) -> int:
    """The largest message a legitimate result can need: 4x the global model's tensor bytes + 1 MiB.

    A result holds at most the model's tensors plus per-strategy extras of the same size (e.g.
    SCAFFOLD's control variate), sparse encodings add their indices; 4x covers them.
    """
    model = sum(int(getattr(v, "nbytes", 0)) for v in global_state.values())
    return 4 * model + 1024 * 1024


@dataclass
class TrackingArgs:
    """FedML's ``tracking_args``.

    Attributes:
        log_file_dir: where ``launch`` writes the processes' logs (default ``<run_dir>/logs``).
    """

    log_file_dir: str | None = None


@dataclass
class _Sections:
    """The FedML sections (parsed with the recipe parser's typed checks)."""

    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)


@dataclass(frozen=True)
class GrpcAddress:
    """One row of FedML's GRPC ipconfig CSV.

    Attributes:
        rank: the process's rank.
        host: where peers reach it (``ingress_ip`` if set, else ``grpc_server_ip``).
        port: its GRPC port.
        bind_host: the address its GRPC server listens on (``grpc_server_ip``).
    """

    rank: int
    host: str
    port: int
    bind_host: str = "127.0.0.1"


@dataclass
class DeploymentConfig:
    """A recipe plus how it is deployed. Build with :meth:`from_yaml` / :meth:`from_dict`.

    Attributes:
        recipe: the resolved recipe (FedML keys and overrides applied).
        common_args, data_args, train_args, device_args, comm_args, tracking_args: the sections.
        base_dir: folder relative paths of the file are resolved against.
    """

    recipe: RecipeConfig
    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    base_dir: Path = field(default_factory=Path.cwd)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        base_dir: str | os.PathLike[str] | None = None,
        overrides: Sequence[str] = (),
        name: str | None = None,
    ) -> DeploymentConfig:
        """Build and validate a deployment config from a mapping.

        Args:
            data: the YAML content (``recipe`` plus FedML sections).
            base_dir: folder that relative paths (``recipe``, ``grpc_ipconfig_path``) refer to.
            overrides: ``key=value`` strings; keys starting with a section name
                (``comm_args.backend=MQTT_S3``) set deployment keys, all others recipe keys
                (``rounds=3``, ``strategy.name=fedprox``).
            name: the deployment's name (:meth:`from_yaml`: the file's stem); it names the run
                (log lines, the default run folder and ``run_id``) instead of the base recipe's
                name, unless ``recipe_overrides`` set ``name``.

        Raises:
            ConfigError: naming the offending key and the valid keys or values.
        """
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        if not isinstance(data, Mapping):
            raise ConfigError(f"a deployment config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        valid = ["recipe", "recipe_overrides", *SECTIONS]
        for key in data:
            if key not in valid:
                raise unknown_key(str(key), str(key), valid, " in the deployment config")
        if "recipe" not in data:
            raise ConfigError("a deployment config needs `recipe`: a recipe file (relative to the config) or a mapping")
        recipe_overrides = coerce(data.get("recipe_overrides") or [], list[str], "recipe_overrides")
        sections_data: dict[str, dict[str, Any]] = {}
        for k in SECTIONS:
            value = data.get(k)
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"`{k}` must be a mapping of keys to values, got {value!r} ({type(value).__name__})")
            sections_data[k] = dict(value or {})
        for item in overrides:
            key, sep, raw = str(item).partition("=")
            head = key.strip().split(".")[0]
            if sep and head in SECTIONS:
                _set_section_key(sections_data, key.strip(), raw)
            else:
                recipe_overrides.append(str(item))
        sections: _Sections = parse_section(_Sections, sections_data, "")
        recipe = _load_recipe(data["recipe"], base)
        mapped = []
        if name and isinstance(data["recipe"], str):
            mapped.append(f"name={name}")
        if sections.common_args.random_seed is not None:
            mapped.append(f"seed={sections.common_args.random_seed}")
        if sections.train_args.comm_round is not None:
            mapped.append(f"rounds={sections.train_args.comm_round}")
        if sections.train_args.client_num_in_total is not None:
            mapped.append(f"data.num_clients={sections.train_args.client_num_in_total}")
        recipe = recipe.apply_overrides([*mapped, *recipe_overrides])
        # the FedML keys that mirror recipe keys always say what the recipe says
        sections.common_args.random_seed = recipe.seed
        sections.train_args.comm_round = recipe.rounds
        sections.train_args.client_num_in_total = recipe.data.num_clients
        cfg = cls(recipe=recipe, base_dir=base, **{k: getattr(sections, k) for k in SECTIONS})
        cfg._validate()
        return cfg

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], *, overrides: Sequence[str] = ()) -> DeploymentConfig:
        """Load a deployment config file (see the module docstring).

        Raises:
            ConfigError: if the file is missing or not valid YAML, or as :meth:`from_dict`.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"deployment config not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        return cls.from_dict(data, base_dir=path.resolve().parent, overrides=overrides, name=path.stem)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the recipe inlined and paths made absolute (reloads to an equal config)."""
        out: dict[str, Any] = {"recipe": self.recipe.to_dict()}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        path = out["comm_args"]["grpc_ipconfig_path"]
        if path is not None:
            out["comm_args"]["grpc_ipconfig_path"] = str(self.resolve_path(path))
        for key in ("ca_file", "cert_file", "key_file"):
            if out["comm_args"]["tls"][key] is not None:
                out["comm_args"]["tls"][key] = str(self.resolve_path(out["comm_args"]["tls"][key]))
        if out["comm_args"]["auth_key_file"] is not None:
            out["comm_args"]["auth_key_file"] = str(self.resolve_path(out["comm_args"]["auth_key_file"]))
        if out["data_args"]["data_cache_dir"] is not None:
            out["data_args"]["data_cache_dir"] = str(self.resolve_path(out["data_args"]["data_cache_dir"]))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def replace(self, **sections: Any) -> DeploymentConfig:
        """A copy with whole sections replaced (e.g. ``comm_args=...``), validated."""
        cfg = dataclasses.replace(self, **sections)
        cfg._validate()
        return cfg

    # -------------------------------------------------------------- derived
    @property
    def run_id(self) -> str:
        return self.common_args.run_id or self.recipe.name

    @property
    def num_clients(self) -> int:
        return int(self.recipe.data.num_clients)

    @property
    def worker_num(self) -> int:
        return int(self.device_args.worker_num or self.num_clients)

    @property
    def run_dir(self) -> Path:
        return self.recipe.resolved_run_dir()

    def log_dir(self) -> Path:
        d = self.tracking_args.log_file_dir
        return self.resolve_path(d) if d is not None else self.run_dir / "logs"

    def clients_of_rank(self, rank: int) -> list[int]:
        """The client ids the process of ``rank`` serves (``1 + c % worker_num == rank``)."""
        if not 1 <= rank <= self.worker_num:
            raise ConfigError(f"client rank must be in 1..{self.worker_num} (device_args.worker_num), got {rank}")
        return [c for c in range(self.num_clients) if c % self.worker_num == rank - 1]

    def rank_of_client(self, client_id: int) -> int:
        return 1 + int(client_id) % self.worker_num

    def authenticator(self, rank: int) -> Any:
        """The message :class:`~lightning_fedprune.fedml_adapters.envelope.Authenticator` of
        ``rank`` from ``comm_args.auth_key_file`` (``None`` without one).

        Raises:
            ConfigError: a missing or malformed key file, or a client key for another rank.
        """
        from lightning_fedprune.fedml_adapters.envelope import Authenticator

        if self.comm_args.auth_key_file is None:
            return None
        path = self.resolve_path(self.comm_args.auth_key_file)
        if not path.is_file():
            raise ConfigError(f"`comm_args.auth_key_file`: no such file {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"`comm_args.auth_key_file`: cannot read {path}: {err}") from None

        def key(name: str) -> bytes:
            value = data.get(name) if isinstance(data, dict) else None
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ConfigError(f"`comm_args.auth_key_file` {path}: `{name}` must be 64 hex digits")
            return bytes.fromhex(value)

        if isinstance(data, dict) and "master" in data:
            return Authenticator(rank, master=key("master"))
        if not isinstance(data, dict) or data.get("rank") != rank:
            holder = data.get("rank") if isinstance(data, dict) else None
            raise ConfigError(f"`comm_args.auth_key_file` {path} holds the key of rank {holder!r}, not of rank {rank}")
        return Authenticator(rank, key=key("key"))

    def tls_files(self, rank: int) -> TlsFiles | None:
        """The TLS material of ``rank`` from ``comm_args.tls`` (``None`` when no file is set).

        Raises:
            ConfigError: only some of the files are set, or one cannot be read or is not PEM.
        """
        t = self.comm_args.tls
        named = {"ca_file": t.ca_file, "cert_file": t.cert_file, "key_file": t.key_file}
        if all(v is None for v in named.values()):
            return None
        missing = [k for k, v in named.items() if v is None]
        if missing:
            raise ConfigError(f"`comm_args.tls` needs ca_file, cert_file and key_file; {', '.join(missing)} not set")
        paths: dict[str, Path] = {}
        data: dict[str, bytes] = {}
        for key, value in named.items():
            path = self.resolve_path(str(value).replace("{rank}", str(int(rank))))
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise ConfigError(f"`comm_args.tls.{key}`: cannot read {path}: {err.strerror or err}") from None
            if b"-----BEGIN " not in raw:
                raise ConfigError(f"`comm_args.tls.{key}`: {path} is not a PEM file")
            paths[key], data[key] = path, raw
        return TlsFiles(
            ca=data["ca_file"], cert=data["cert_file"], key=data["key_file"], ca_path=paths["ca_file"],
            cert_path=paths["cert_file"], key_path=paths["key_file"], mutual=bool(t.mutual),
        )

    def require_security(self, rank: int) -> tuple[Any, TlsFiles | None]:
        """``(authenticator, TLS files)`` of ``rank``'s process; both are required unless
        ``comm_args.insecure`` is true (then a warning is logged and whatever is set is used).

        Raises:
            ConfigError: security is required and a part is missing, naming how to provide it.
        """
        auth, tls = self.authenticator(rank), self.tls_files(rank)
        if self.comm_args.insecure:
            if auth is None or tls is None:
                logging.getLogger(__name__).warning(
                    "rank %d runs INSECURE (comm_args.insecure: true):%s%s anyone who reaches this process can read "
                    "its messages or impersonate a peer; use it only on a closed network you trust",
                    rank, "" if tls is not None else " no TLS,", "" if auth is not None else " no message authentication,",
                )
            return auth, tls
        missing = [name for name, part in (("comm_args.tls", tls), ("comm_args.auth_key_file", auth)) if part is None]
        if missing:
            raise ConfigError(
                f"rank {rank}: {' and '.join(f'`{m}`' for m in missing)} not set: deployments use TLS and authenticated "
                "messages. Generate the files with `python -m lightning_fedprune credentials CONFIG --out DIR` (`launch` "
                "does it by itself), or set `comm_args.insecure: true` to run without them on a closed network"
            )
        return auth, tls

    def resolve_path(self, path: str | os.PathLike[str]) -> Path:
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else self.base_dir / p

    def grpc_addresses(self) -> dict[int, GrpcAddress]:
        """rank -> address of every process (server rank 0 and ranks 1..worker_num).

        Raises:
            ConfigError: if the ipconfig file misses a rank or is malformed.
        """
        ranks = range(self.worker_num + 1)
        if self.comm_args.grpc_ipconfig_path is None:
            return {r: GrpcAddress(r, "127.0.0.1", self.comm_args.grpc_base_port + r) for r in ranks}
        table = read_grpc_ipconfig(self.resolve_path(self.comm_args.grpc_ipconfig_path))
        missing = [r for r in ranks if r not in table]
        if missing:
            raise ConfigError(f"comm_args.grpc_ipconfig_path {self.comm_args.grpc_ipconfig_path} has no row for ranks {missing}")
        return table

    # -------------------------------------------------------------- checks
    def _validate(self) -> None:
        c = self.comm_args
        if c.backend not in BACKENDS:
            raise ConfigError(f"`comm_args.backend` can be {', '.join(BACKENDS)}; got {c.backend!r}")
        if not _RUN_ID.match(self.run_id):
            raise ConfigError(f"`common_args.run_id` must be 1-100 characters of [A-Za-z0-9_.-], got {self.run_id!r}")
        if self.common_args.training_type not in ("cross_silo", "cross_device"):
            raise ConfigError(f"`common_args.training_type` can be cross_silo, cross_device; got {self.common_args.training_type!r}")
        if not 1 <= c.grpc_base_port <= 65535 - self.worker_num:
            raise ConfigError(f"`comm_args.grpc_base_port` must leave room for {self.worker_num + 1} ports, got {c.grpc_base_port}")
        for key in ("max_message_bytes", "mqtt_inline_bytes"):
            if getattr(c, key) is not None and getattr(c, key) < 1024:
                raise ConfigError(f"`comm_args.{key}` must be >= 1024, got {getattr(c, key)}")
        for section, key in (
            ("comm_args", "send_timeout_s"),
            ("comm_args", "connect_timeout_s"),
            ("comm_args", "hello_interval_s"),
            ("train_args", "round_timeout_s"),
            ("train_args", "startup_timeout_s"),
        ):
            v = getattr(getattr(self, section), key)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"`{section}.{key}` must be a number of seconds > 0, got {v!r}")
        idle = self.device_args.max_idle_s
        if idle is not None and not (math.isfinite(idle) and idle > 0):
            raise ConfigError(f"`device_args.max_idle_s` must be null or a number of seconds > 0, got {idle!r}")
        w = self.device_args.worker_num
        if w is not None and not 1 <= w <= self.num_clients:
            raise ConfigError(
                f"`device_args.worker_num` must be in 1..data.num_clients ({self.num_clients}): every process serves "
                f"at least one client, got {w}"
            )
        for key, need in (("customized_training_mqtt_config", MQTT_KEYS), ("customized_training_s3_config", S3_KEYS)):
            value = getattr(c, key)
            if value:
                missing = [k for k in need if k not in value]
                if missing:
                    raise ConfigError(f"`comm_args.{key}` lacks {missing}; it needs {', '.join(need)}")

    def require_services(self) -> None:
        """Raise unless the MQTT_S3 broker and store are configured (the server/client commands need them).

        Raises:
            ConfigError: naming the empty section.
        """
        if self.comm_args.backend != "MQTT_S3":
            return
        for key, what in (
            ("customized_training_mqtt_config", "an MQTT broker (e.g. Debian's mosquitto)"),
            ("customized_training_s3_config", "an S3-compatible store (e.g. `moto_server`)"),
        ):
            if not getattr(self.comm_args, key):
                raise ConfigError(
                    f"`comm_args.{key}` is empty: the MQTT_S3 backend needs {what}. Set it, or use "
                    "`python -m lightning_fedprune launch`, which starts local ones"
                )


def _load_recipe(value: Any, base: Path) -> RecipeConfig:
    if isinstance(value, Mapping):
        return RecipeConfig.from_dict(value)
    if isinstance(value, str):
        return RecipeConfig.from_yaml(base / value if not Path(value).is_absolute() else value)
    raise ConfigError(f"`recipe` must be a file name or a mapping, got {value!r} ({type(value).__name__})")


def _set_section_key(sections: dict[str, dict[str, Any]], key: str, raw: str) -> None:
    parts = key.split(".")
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(f"override key {key!r} must look like section.key, e.g. comm_args.backend=MQTT_S3")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of `{key}` ({raw!r}) as YAML: {err}") from err
    node = sections[parts[0]]
    for p in parts[1:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and parts[-1] in ("run_id", "training_type", "backend"):
        value = raw.strip()
    node[parts[-1]] = value


def read_grpc_ipconfig(path: str | os.PathLike[str]) -> dict[int, GrpcAddress]:
    """Read FedML's GRPC ipconfig CSV (``eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]``).

    ``ingress_ip``, when set, is the address peers use to reach the rank (behind NAT).

    Raises:
        ConfigError: if the file is missing or a row is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comm_args.grpc_ipconfig_path: no such file {path}")
    out: dict[int, GrpcAddress] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), 2):
            try:
                rank = int(row["rank"])
                bind = row["grpc_server_ip"].strip()
                host = (row.get("ingress_ip") or "").strip() or bind
                port = int(row["grpc_server_port"])
            except (KeyError, TypeError, ValueError) as err:
                raise ConfigError(
                    f"{path}:{lineno}: expected columns eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip] ({err})"
                ) from None
            if not 1 <= port <= 65535:
                raise ConfigError(f"{path}:{lineno}: port {port} is not in 1..65535")
            out[rank] = GrpcAddress(rank, host, port, bind)
    return out


def write_grpc_ipconfig(path: str | os.PathLike[str], addresses: Mapping[int, GrpcAddress]) -> Path:
    """Write FedML's GRPC ipconfig CSV for ``addresses`` (rank -> address)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["eid", "rank", "grpc_server_ip", "grpc_server_port", "ingress_ip"])
        for rank in sorted(addresses):
            a = addresses[rank]
            w.writerow([rank, rank, a.bind_host, a.port, a.host if a.host != a.bind_host else ""])
    return path


def write_auth_keys(out_dir: str | os.PathLike[str], worker_num: int) -> dict[str, Path]:
    """Generate a deployment's message keys: ``master.json`` for the server (and one-machine runs)
    and ``rank_<r>.json`` for each client rank ``1..worker_num``, holding only that client's key.
    Files are created readable by their owner only (0600).

    Returns:
        ``{"master": path, "rank_1": path, ...}``.
    """
    import secrets

    from lightning_fedprune.fedml_adapters.envelope import rank_key

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    master = secrets.token_bytes(32)
    files = {"master": out / "master.json"}
    files.update({f"rank_{r}": out / f"rank_{r}.json" for r in range(1, int(worker_num) + 1)})
    for name, path in files.items():
        body = {"master": master.hex()} if name == "master" else {"rank": int(name[5:]), "key": rank_key(master, int(name[5:])).hex()}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh)
        os.chmod(path, 0o600)
    return files
