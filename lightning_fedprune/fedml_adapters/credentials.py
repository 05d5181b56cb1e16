"""A deployment's credentials: a private CA, one TLS certificate per rank, message keys.

Every process of a deployment holds a certificate signed by the deployment's own CA: the common
name says its rank (``lfp-rank-<r>``) and the subject alternative names list the hosts peers reach
it at. The same certificate serves three purposes:

* GRPC: a process's server presents it to its peers (TLS); with ``comm_args.tls.mutual`` (the
  default) it also presents it as a client, and the receiving server checks that the certificate's
  rank is the rank the request claims;
* MQTT: the process presents it to the broker, which takes the common name as the user name and
  allows each user only its own topics (:func:`mosquitto_acl`);
* the S3 store (and the broker) present ``broker.pem``, signed by the same CA.

:func:`write_credentials` writes all of it for one deployment (``launch`` does, under
``<run_dir>/launch/credentials``; the ``credentials`` command does for a real multi-host set-up):
files are created readable by their owner only. Keys are EC P-256 (``cryptography``, which the
FedML extra installs); certificates are valid for ``days`` days.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RANK_CN_PREFIX",
    "BROKER_CN",
    "rank_common_name",
    "rank_of_common_name",
    "write_credentials",
    "write_private",
    "mosquitto_acl",
]

RANK_CN_PREFIX = "lfp-rank-"
BROKER_CN = "lfp-broker"
_RANK_CN = re.compile(r"^lfp-rank-(\d{1,6})$")


def rank_common_name(rank: int) -> str:
    """The certificate common name of ``rank``'s process."""
    return f"{RANK_CN_PREFIX}{int(rank)}"


def rank_of_common_name(name: Any) -> int | None:
    """The rank a certificate common name (str or bytes) stands for, or None if it names none."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(name, str):
        return None
    m = _RANK_CN.match(name)
    return int(m.group(1)) if m else None


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path``, created readable and writable by its owner only (0600)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path


def _san(hosts: Iterable[str]) -> Any:
    from cryptography import x509

    names: list[Any] = []
    seen: set[str] = set()
    for host in hosts:
        host = str(host).strip()
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject_cn: str, key: Any, *, issuer: Any, issuer_key: Any, hosts: Iterable[str] = (), ca: bool = False, days: int) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=int(days)))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(_san(hosts), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def write_credentials(
    out_dir: str | os.PathLike[str],
    worker_num: int,
    *,
    rank_hosts: Mapping[int, Iterable[str]] | None = None,
    broker_hosts: Iterable[str] = (),
    days: int = 30,
) -> dict[str, Path]:
    """Generate a deployment's CA, rank certificates, broker/store certificate and message keys.

    Args:
        out_dir: folder to write into (created).
        worker_num: client ranks ``1..worker_num`` (rank 0 is the server).
        rank_hosts: rank -> host names / IP addresses peers reach it at (its certificate's
            alternative names); 127.0.0.1 and localhost are always included.
        broker_hosts: the MQTT broker's and S3 store's hosts (same rule).
        days: validity of the certificates.

    Returns:
        ``{"ca": ca.pem, "cert_<r>": rank_<r>.pem, "key_<r>": rank_<r>.key, "broker_cert": broker.pem,
        "broker_key": broker.key, "master": keys/master.json, "rank_<r>": keys/rank_<r>.json}``.
        The CA's private key is not kept: nobody can sign another certificate for this deployment.
    """
    from cryptography.hazmat.primitives import serialization

    from lightning_fedprune.fedml_adapters.settings import write_auth_keys

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    local = ("127.0.0.1", "localhost")
    ca_key = _new_key()
    ca_cert = _cert("lfp-deployment-ca", ca_key, issuer=None, issuer_key=None, ca=True, days=days)
    pem = serialization.Encoding.PEM
    files: dict[str, Path] = {"ca": write_private(out / "ca.pem", ca_cert.public_bytes(pem))}
    for rank in range(int(worker_num) + 1):
        key = _new_key()
        hosts = [*local, *((rank_hosts or {}).get(rank, ()))]
        cert = _cert(rank_common_name(rank), key, issuer=ca_cert.subject, issuer_key=ca_key, hosts=hosts, days=days)
        files[f"cert_{rank}"] = write_private(out / f"rank_{rank}.pem", cert.public_bytes(pem))
        files[f"key_{rank}"] = write_private(out / f"rank_{rank}.key", _key_pem(key))
    key = _new_key()
    cert = _cert(BROKER_CN, key, issuer=ca_cert.subject, issuer_key=ca_key, hosts=[*local, *broker_hosts], days=days)
    files["broker_cert"] = write_private(out / "broker.pem", cert.public_bytes(pem))
    files["broker_key"] = write_private(out / "broker.key", _key_pem(key))
    files.update(write_auth_keys(out / "keys", worker_num))
    return files


def mosquitto_acl(run_id: str, worker_num: int) -> str:
    """A mosquitto ACL file that lets each rank's certificate identity use only its own topics.

    The server (``lfp-rank-0``) publishes ``fedml_<run>_0_<r>`` and reads ``fedml_<run>_<r>``;
    client rank ``r`` the other way round, for its own ``r`` only. Every other topic is denied.
    """
    clients = range(1, int(worker_num) + 1)
    lines = [f"user {rank_common_name(0)}"]
    for r in clients:
        lines += [f"topic write fedml_{run_id}_0_{r}", f"topic read fedml_{run_id}_{r}"]
    lines.append("")
    for r in clients:
        lines += [f"user {rank_common_name(r)}", f"topic write fedml_{run_id}_{r}", f"topic read fedml_{run_id}_0_{r}", ""]
    return "\n".join(lines)
