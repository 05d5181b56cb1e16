"""Client packages for edge devices, made with FedML's offline ``fedml build``.

:func:`build_client_package` stages a source folder and a config folder and hands them to FedML's
``build`` (the code behind ``fedml build -t client -sf SRC -ep main_client.py -cf CONFIG -df OUT``),
which writes ``OUT/dist-packages/client-package.zip``. Unzipped, the package holds::

    client-package/conf/fedml.yaml                 FedML's package descriptor (entry file, config file)
    client-package/fedml/main_client.py            entry point: runs the client of the packaged rank
    client-package/fedml/lightning_fedprune/...    this library's code (no install needed)
    client-package/fedml/requirements.txt          what to pip-install on the device
    client-package/fedml/data/                     the rank's own samples (``--with-data``)
    client-package/fedml/config/fedml_config.yaml  the deployment config (recipe inlined)

On the device: ``pip install -r requirements.txt`` once, then ``python main_client.py`` in the
``fedml`` folder. Nothing of FedML's cloud (``login``, ``launch``, ``run``) is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from lightning_fedprune.errors import ConfigError
from lightning_fedprune.fedml_adapters.settings import DeploymentConfig, read_grpc_ipconfig, write_grpc_ipconfig

log = logging.getLogger(__name__)

__all__ = ["build_client_package", "PACKAGE_ZIP", "ENTRY_POINT", "CONFIG_FILE"]

PACKAGE_ZIP = Path("dist-packages") / "client-package.zip"
ENTRY_POINT = "main_client.py"
#: FedML's package descriptor names the config file so
CONFIG_FILE = "fedml_config.yaml"

_REQUIREMENTS = """\
# pip install -r requirements.txt  (on a Raspberry Pi / Jetson see docs/deployment.md for torch)
torch>=2.2
torchvision
lightning>=2.2
torchmetrics>=1.3
torch-pruning>=1.5
timm>=1.0
rich>=13
safetensors>=0.4
matplotlib>=3.7
scikit-learn>=1.3
pyyaml>=6
fedml==0.9.6
setuptools<81
grpcio
"""

_ENTRY = '''\
"""Entry point of a lightning_fedprune client package (built with `fedml build`).

Runs the client process of rank {rank} with the packaged config; any arguments replace the
default command line, e.g. `python main_client.py client config/fedml_config.yaml --rank {rank}
--set comm_args.connect_timeout_s=600`.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from lightning_fedprune.cli import main  # noqa: E402

if __name__ == "__main__":
    os.chdir(HERE)  # the config's relative paths (data, run folder) are the package's
    argv = sys.argv[1:] or ["client", os.path.join("config", "{config}"), "--rank", "{rank}"]
    sys.exit(main(argv))
'''


def build_client_package(cfg: DeploymentConfig, rank: int, out_dir: str | os.PathLike[str], *, with_data: bool = True) -> Path:
    """Build the client package of ``rank`` with FedML's ``build``; returns the zip's path.

    Args:
        cfg: the deployment config.
        rank: the client process's rank.
        out_dir: gets ``staging/`` (what was packaged) and ``dist-packages/client-package.zip``.
        with_data: export the rank's own samples into the package (``data_args.data_cache_dir``
            then points at them); otherwise the device needs the recipe's dataset.

    Raises:
        ConfigError: on a bad rank, or when FedML's build fails.
    """
    from lightning_fedprune.fedml_adapters.components import export_client_data

    clients = cfg.clients_of_rank(rank)
    out = Path(out_dir).resolve()
    staging = out / "staging"
    if staging.exists():
        shutil.rmtree(staging)
    source, config_dir = staging / "source", staging / "config"
    source.mkdir(parents=True)
    config_dir.mkdir(parents=True)
    package_root = Path(__file__).resolve().parents[1]
    shutil.copytree(package_root, source / "lightning_fedprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / ENTRY_POINT).write_text(_ENTRY.format(rank=int(rank), config=CONFIG_FILE), encoding="utf-8")
    (source / "requirements.txt").write_text(_REQUIREMENTS, encoding="utf-8")

    data: dict[str, Any] = cfg.to_dict()
    if with_data:
        export_client_data(cfg, rank, source / "data")
        data["data_args"]["data_cache_dir"] = "../data"  # relative to the config file
    if cfg.comm_args.backend == "GRPC":
        if cfg.comm_args.grpc_ipconfig_path is not None:
            table = read_grpc_ipconfig(cfg.resolve_path(cfg.comm_args.grpc_ipconfig_path))
            write_grpc_ipconfig(config_dir / "grpc_ipconfig.csv", table)
            data["comm_args"]["grpc_ipconfig_path"] = "grpc_ipconfig.csv"
        else:
            log.warning(
                "comm_args.grpc_ipconfig_path is null: the package reaches the server at 127.0.0.1; for a device on "
                "another host write FedML's ipconfig CSV and set comm_args.grpc_ipconfig_path"
            )
    data["comm_args"].update(_rank_credentials(cfg, rank, config_dir / "credentials"))
    data["recipe"]["run_dir"] = f"runs/{cfg.run_id}"  # relative to the package folder on the device
    (config_dir / CONFIG_FILE).write_text(
        f"# client package of rank {rank} (clients {clients}) of run {cfg.run_id!r}\n"
        + yaml.safe_dump(data, sort_keys=False, default_flow_style=None),
        encoding="utf-8",
    )
    _fedml_build(source, config_dir, out)
    zip_path = out / PACKAGE_ZIP
    if not zip_path.is_file():
        raise ConfigError(f"fedml build did not write {zip_path}")
    log.info("client package of rank %d: %s", rank, zip_path)
    return zip_path


def _rank_credentials(cfg: DeploymentConfig, rank: int, folder: Path) -> dict[str, Any]:
    """Copy what the client of ``rank`` needs of the deployment's credentials into ``folder``
    (its certificate and key, the CA certificate, its own message key: never the master key or
    another rank's), owner-only; returns the ``comm_args`` keys that point at them (relative to
    the package's config file)."""
    from lightning_fedprune.fedml_adapters.credentials import write_private

    auth, tls = cfg.authenticator(rank), cfg.tls_files(rank)
    out: dict[str, Any] = {}
    if auth is None and tls is None:
        return out
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if tls is not None:
        write_private(folder / "ca.pem", tls.ca)
        write_private(folder / f"rank_{rank}.pem", tls.cert)
        write_private(folder / f"rank_{rank}.key", tls.key)
        out["tls"] = {
            "ca_file": f"{folder.name}/ca.pem", "cert_file": f"{folder.name}/rank_{rank}.pem",
            "key_file": f"{folder.name}/rank_{rank}.key", "mutual": tls.mutual,
        }
    if auth is not None:
        write_private(folder / f"rank_{rank}.json", json.dumps(auth.client_key_file()).encode("utf-8"))
        out["auth_key_file"] = f"{folder.name}/rank_{rank}.json"
    return out


def _fedml_build(source: Path, config_dir: Path, out: Path) -> None:
    """FedML's offline ``fedml build -t client`` (no login, no network)."""
    from lightning_fedprune.fedml_adapters.transport import quiet_fedml_environment

    quiet_fedml_environment()
    from fedml.api.modules.build import build

    try:
        build("octopus", "client", str(source), ENTRY_POINT, str(config_dir), str(out), "__pycache__,*.pyc")
    except SystemExit as exit_:  # FedML's build exits on errors
        raise ConfigError(f"fedml build failed with code {exit_.code}") from None
