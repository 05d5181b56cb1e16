"""Split a dataset's training set among federated clients.

Every partitioner returns one sorted ``int64`` index array per client. Unless stated otherwise,
the arrays are disjoint, together cover every index ``0..N-1`` exactly once, are all non-empty,
and depend only on the arguments and ``seed`` (a :class:`numpy.random.Generator` is built from
it). Impossible requests (e.g. more clients than samples) raise :class:`DataError`.

"Classes" always means the distinct labels present in ``targets``; labels need not be
contiguous.

:func:`make_partition` picks a scheme by name and additionally carves a local test set out of
each client's indices, returning a :class:`Partition`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_fedprune.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "PARTITION_SCHEMES",
    "ClientSplit",
    "Partition",
    "make_partition",
    "partition_by_group",
    "partition_dirichlet",
    "partition_dominant_label",
    "partition_iid",
    "partition_missing_classes",
    "partition_shards",
]


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


def _index_array(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        arr = arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{what} must be a 1-D sequence of integer indices, got {arr.dtype} {arr.shape}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{what} must hold non-negative indices, got minimum {int(arr.min())}")
    out = np.sort(arr.astype(np.int64, copy=True))
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class ClientSplit:
    """One client's indices into the dataset's *training* set.

    Both arrays are stored sorted, as read-only ``int64`` arrays.

    Attributes:
        train: Indices the client trains on (non-empty when built by :func:`make_partition`).
        test: Indices of the client's local validation/test set; possibly empty.
    """

    train: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", _index_array(self.train, "ClientSplit.train"))
        object.__setattr__(self, "test", _index_array(self.test, "ClientSplit.test"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientSplit):
            return NotImplemented
        return np.array_equal(self.train, other.train) and np.array_equal(self.test, other.test)

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.train) + len(self.test)


@dataclass(frozen=True, eq=False)
class Partition:
    """The per-client splits of a dataset's training set.

    Attributes:
        clients: One :class:`ClientSplit` per client, in client-id order.
    """

    clients: tuple[ClientSplit, ...]

    def __post_init__(self) -> None:
        clients = tuple(self.clients)
        for i, c in enumerate(clients):
            if not isinstance(c, ClientSplit):
                raise DataError(f"Partition.clients[{i}] must be a ClientSplit, got {type(c).__name__}")
        object.__setattr__(self, "clients", clients)

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, client: int) -> ClientSplit:
        return self.clients[client]

    def __iter__(self):  # noqa: D105
        return iter(self.clients)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self.clients, other.clients))

    __hash__ = None  # type: ignore[assignment]

    def sizes(self) -> list[int]:
        """Number of *training* samples of each client (the usual FedAvg weights).

        Returns:
            ``[len(c.train) for c in clients]``.
        """
        return [len(c.train) for c in self.clients]

    def test_sizes(self) -> list[int]:
        """Number of local test samples of each client.

        Returns:
            ``[len(c.test) for c in clients]``.
        """
        return [len(c.test) for c in self.clients]

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form: ``{"clients": [{"train": [...], "test": [...]}, ...]}``.

        Returns:
            The dictionary; :meth:`from_json` inverts it.
        """
        return {
            "clients": [{"train": c.train.tolist(), "test": c.test.tolist()} for c in self.clients]
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Partition:
        """Rebuild a partition from :meth:`to_json`'s output.

        Args:
            data: A mapping with key ``"clients"``: a list of ``{"train": [...], "test": [...]}``.

        Returns:
            The partition.

        Raises:
            DataError: If ``data`` does not have that structure.
        """
        if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
            raise DataError(
                'partition JSON must be an object {"clients": [{"train": [...], "test": [...]}, ...]}, '
                f"got {type(data).__name__}"
                + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
            )
        clients = []
        for i, entry in enumerate(data["clients"]):
            if not isinstance(entry, dict) or "train" not in entry:
                raise DataError(
                    f'partition JSON clients[{i}] must be an object with "train" (and optional '
                    f'"test") index lists, got {entry!r:.80}'
                )
            clients.append(ClientSplit(train=entry["train"], test=entry.get("test", [])))
        return cls(clients=tuple(clients))


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"{name} must be finite, got {value!r}")
    return value


def _as_targets(targets: Any) -> np.ndarray:
    if hasattr(targets, "detach") and hasattr(targets, "cpu"):  # torch tensor
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 1:
        raise DataError(f"targets must be a 1-D sequence of integer labels, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError("targets is empty: there are no samples to partition")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"targets must hold integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_enough(num_samples: int, num_clients: int, per_client: int = 1) -> None:
    if num_samples < num_clients * per_client:
        raise DataError(
            f"cannot give each of num_clients={num_clients} clients at least {per_client} "
            f"sample(s) from {num_samples} samples; use num_clients <= {num_samples // per_client}"
        )


def _finish(parts: Sequence[np.ndarray], scheme: str) -> list[np.ndarray]:
    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    empty = [i for i, p in enumerate(out) if len(p) == 0]
    if empty:
        raise DataError(
            f"{scheme} partition left client(s) {empty[:10]} without samples; use fewer clients "
            "or a less extreme setting"
        )
    return out


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------


def partition_iid(num_samples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and cut them into ``num_clients`` near-equal parts.

    Client sizes differ by at most one (the first ``num_samples % num_clients`` clients get one
    more).

    Args:
        num_samples: Number of samples ``N`` (indices ``0..N-1``).
        num_clients: Number of clients (>= 1, <= ``num_samples``).
        seed: Seed of the shuffle.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        DataError: On invalid arguments or more clients than samples.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    num_clients = _check_int("num_clients", num_clients, 1)
    rng = np.random.default_rng(_check_seed(seed))
    _check_enough(num_samples, num_clients)
    return _finish(np.array_split(rng.permutation(num_samples), num_clients), "iid")


def partition_shards(
    targets: Any, num_clients: int, *, shards_per_client: int = 2, seed: int
) -> list[np.ndarray]:
    """Label-sorted shards (McMahan et al., 2017).

    Indices are shuffled, then stably sorted by label (so a shard holds random samples of its
    label), cut into ``num_clients * shards_per_client`` contiguous shards of near-equal size,
    and each client receives ``shards_per_client`` shards drawn at random without replacement.
    When the shard size ``N / (num_clients * shards_per_client)`` is an integer dividing every
    class's sample count (e.g. MNIST-like balanced classes, 100 clients x 2 shards of 300), no
    shard straddles two labels, so each client holds at most ``shards_per_client`` labels.

    Args:
        targets: One integer label per sample.
        num_clients: Number of clients (>= 1).
        shards_per_client: Shards per client (>= 1).
        seed: Seed of the shuffles.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        DataError: On invalid arguments or fewer samples than shards.
    """
    y = _as_targets(targets)
    num_clients = _check_int("num_clients", num_clients, 1)
    shards_per_client = _check_int("shards_per_client", shards_per_client, 1)
    rng = np.random.default_rng(_check_seed(seed))
    num_shards = num_clients * shards_per_client
    if len(y) < num_shards:
        raise DataError(
            f"shards partition needs at least num_clients * shards_per_client = {num_shards} "
            f"samples, got {len(y)}; use fewer clients or a smaller shards_per_client"
        )
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    shard_ids = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([shards[s] for s in row]) for row in shard_ids], "shards")


def partition_dirichlet(
    targets: Any,
    num_clients: int,
    *,
    beta: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 1000,
    balance: bool = True,
) -> list[np.ndarray]:
    """Label-skewed split with per-class Dirichlet proportions (Hsu et al., 2019).

    One draw: the classes are visited in a random order; for class ``c`` with shuffled indices
    of length ``n_c``, proportions ``p ~ Dirichlet(beta * 1_K)`` are drawn, and (if ``balance``,
    the rule of the FedMA / NIID-Bench reference code) the proportion of every client that
    already holds at least ``N / K`` samples is set to 0 and ``p`` renormalised; the class is cut
    at ``floor(cumsum(p) * n_c)``. If some client ends with fewer than ``min_size`` samples, a
    whole new draw is made, up to ``max_tries`` draws. Small ``beta`` (e.g. 0.01) gives each
    client very few labels (one, when ``K == C`` and ``balance``); large ``beta`` (e.g. 1000)
    approaches an IID split.

    Args:
        targets: One integer label per sample.
        num_clients: Number of clients (>= 1).
        beta: Dirichlet concentration (> 0).
        seed: Seed of the draws.
        min_size: Minimum samples per client (>= 1).
        max_tries: Maximum number of draws before giving up (>= 1).
        balance: Apply the balancing rule above (default True; without it tiny ``beta`` with
            ``K >= C`` almost never gives every client a sample).

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        DataError: On invalid arguments, or if no draw within ``max_tries`` gives every client
            ``min_size`` samples.
    """
    y = _as_targets(targets)
    num_clients = _check_int("num_clients", num_clients, 1)
    beta = _check_real("beta", beta)
    if beta <= 0:
        raise DataError(f"beta must be > 0, got {beta!r}")
    min_size = _check_int("min_size", min_size, 1)
    max_tries = _check_int("max_tries", max_tries, 1)
    if not isinstance(balance, (bool, np.bool_)):
        raise DataError(f"balance must be True or False, got {balance!r}")
    rng = np.random.default_rng(_check_seed(seed))
    n = len(y)
    _check_enough(n, num_clients, min_size)

    _, inv = np.unique(y, return_inverse=True)
    num_classes = int(inv.max()) + 1
    class_idx = [rng.permutation(np.flatnonzero(inv == c)) for c in range(num_classes)]
    alpha = np.full(num_clients, beta)
    cap = n / num_clients
    for attempt in range(1, max_tries + 1):
        cuts: dict[int, np.ndarray] = {}
        sizes = np.zeros(num_clients, dtype=np.int64)
        ok = True
        for c in rng.permutation(num_classes):
            idx = class_idx[c]
            p = rng.dirichlet(alpha)
            if balance:
                p = p * (sizes < cap)
            total = p.sum()
            if not (np.isfinite(total) and total > 0):
                ok = False  # all mass on full clients (possible for tiny beta): draw again
                break
            cut = np.floor(np.cumsum(p / total) * len(idx)).astype(np.int64)
            cut = np.minimum(cut, len(idx))
            cut[-1] = len(idx)
            cuts[int(c)] = cut
            sizes += np.diff(cut, prepend=0)
        if ok and sizes.min() >= min_size:
            log.debug("dirichlet partition found after %d draw(s)", attempt)
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for c, idx in enumerate(class_idx):
                for k, chunk in enumerate(np.split(idx, cuts[c][:-1])):
                    parts[k].append(chunk)
            return _finish([np.concatenate(p) for p in parts], "dirichlet")
    raise DataError(
        f"dirichlet partition: no draw in max_tries={max_tries} gave each of {num_clients} clients "
        f"at least min_size={min_size} samples (beta={beta}, {n} samples); use a larger "
        "beta, fewer clients, a smaller min_size or a larger max_tries"
    )


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer split of ``total`` proportional to ``weights`` (largest remainder), each <= weight."""
    w = weights.astype(np.int64)
    denom = int(w.sum())
    if denom == 0:
        return np.zeros_like(w)
    numer = w * total
    out = numer // denom
    rest = total - int(out.sum())
    if rest:
        order = np.argsort(-(numer % denom), kind="stable")
        out[order[:rest]] += 1
    return out


def partition_dominant_label(
    targets: Any, num_clients: int, *, dominant_fraction: float, seed: int
) -> list[np.ndarray]:
    """FedMP-style non-IID level ``y``: each client draws a fraction ``y`` from one label.

    Construction (``N`` samples, ``K`` clients, ``C`` classes = sorted distinct labels):

    1. Client sizes are equal up to rounding: ``n_k = N // K``, plus one for the first
       ``N % K`` clients.
    2. Client ``k``'s dominant label is class ``k mod C``. Its target count for that label is
       ``round(y * n_k)``; the remaining ``n_k - round(y * n_k)`` are spread evenly over the other
       ``C - 1`` labels. The remainders of those divisions are handed out one at a time
       round-robin over the classes (from a random start, skipping each client's dominant label),
       so the demand for every class stays balanced. With ``C == 1`` every sample is of the
       dominant label.
    3. Where the clients together ask for more samples of a class than exist, the excess is
       removed first from the non-dominant requests for that class (proportionally,
       largest-remainder rounding) and only then from the dominant ones.
    4. Each class's shuffled indices are handed out in those counts; the samples nobody asked
       for (leftovers) are shuffled together and dealt to the clients still below ``n_k``.

    The result is covering and disjoint with sizes exactly ``n_k``. When classes are balanced and
    ``K`` is a multiple of ``C``, every client gets ``round(y * n_k)`` samples of its dominant
    label (up to the leftovers of rounding); otherwise the dominant share is as close to ``y`` as
    the class sizes allow (e.g. with ``K < C`` and large ``y`` the dominant classes run out).
    ``y = 1/C`` (e.g. 0.1 with 10 classes) is approximately IID, ``y = 1`` gives single-label
    clients.

    Args:
        targets: One integer label per sample.
        num_clients: Number of clients (>= 1, <= number of samples).
        dominant_fraction: ``y``, in ``[0, 1]``.
        seed: Seed of the shuffles.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        DataError: On invalid arguments or more clients than samples.
    """
    y = _as_targets(targets)
    num_clients = _check_int("num_clients", num_clients, 1)
    frac = _check_real("dominant_fraction", dominant_fraction)
    if not 0.0 <= frac <= 1.0:
        raise DataError(f"dominant_fraction must be in [0, 1], got {dominant_fraction!r}")
    rng = np.random.default_rng(_check_seed(seed))
    n = len(y)
    _check_enough(n, num_clients)

    _, inv = np.unique(y, return_inverse=True)
    num_classes = int(inv.max()) + 1
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1

    dominant = np.arange(num_clients) % num_classes
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    pointer = int(rng.integers(num_classes))  # where the next "+1" of a remainder goes
    for k in range(num_clients):
        dom = int(dominant[k])
        if num_classes == 1:
            counts[k, 0] = sizes[k]
            continue
        n_dom = int(math.floor(frac * sizes[k] + 0.5))
        base, extra = divmod(int(sizes[k]) - n_dom, num_classes - 1)
        counts[k, :] = base
        while extra:
            c = pointer % num_classes
            pointer += 1
            if c != dom:
                counts[k, c] += 1
                extra -= 1
        counts[k, dom] = n_dom

    supply = np.bincount(inv, minlength=num_classes)
    for c in range(num_classes):
        excess = int(counts[:, c].sum()) - int(supply[c])
        if excess <= 0:
            continue
        rows = dominant != c
        spread = int(counts[rows, c].sum())
        if spread >= excess:
            counts[rows, c] = _apportion(spread - excess, counts[rows, c])
        else:
            counts[rows, c] = 0
            counts[~rows, c] = _apportion(int(supply[c]), counts[~rows, c])

    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    leftovers = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(inv == c))
        start = 0
        for k in range(num_clients):
            parts[k].append(idx[start : start + counts[k, c]])
            start += int(counts[k, c])
        leftovers.append(idx[start:])
    pool = rng.permutation(np.concatenate(leftovers))
    deficits = sizes - counts.sum(axis=1)
    start = 0
    for k in range(num_clients):
        parts[k].append(pool[start : start + deficits[k]])
        start += int(deficits[k])
    return _finish([np.concatenate(p) for p in parts], "dominant_label")


def partition_missing_classes(
    targets: Any, num_clients: int, *, missing: int, seed: int
) -> list[np.ndarray]:
    """Each client lacks exactly ``missing`` classes; every class is still held by someone.

    With ``C`` classes and ``h = C - missing`` classes per client, the classes are put in a
    random order ``perm`` and client ``k`` holds ``perm[(k*h + j) mod C]`` for ``j < h``
    (consecutive windows around the cycle, so the number of holders per class differs by at most
    one). Each class's shuffled samples are split evenly (sizes differ by at most one) among the
    clients that hold it.

    Args:
        targets: One integer label per sample.
        num_clients: Number of clients (>= 1); needs ``num_clients * (C - missing) >= C``.
        missing: Classes each client lacks, ``0 <= missing < C``.
        seed: Seed of the class order and shuffles.

    Returns:
        One sorted ``int64`` index array per client.

    Raises:
        DataError: On invalid arguments, if the clients cannot cover every class, or if a client
            would get no sample.
    """
    y = _as_targets(targets)
    num_clients = _check_int("num_clients", num_clients, 1)
    _, inv = np.unique(y, return_inverse=True)
    num_classes = int(inv.max()) + 1
    if isinstance(missing, bool) or not isinstance(missing, (int, np.integer)) or not (
        0 <= missing < num_classes
    ):
        raise DataError(
            f"missing must be an integer with 0 <= missing < {num_classes} (the number of classes "
            f"in targets), got {missing!r}"
        )
    missing = int(missing)
    rng = np.random.default_rng(_check_seed(seed))
    _check_enough(len(y), num_clients)
    held = num_classes - missing
    if num_clients * held < num_classes:
        max_missing = num_classes - math.ceil(num_classes / num_clients)
        raise DataError(
            f"with num_clients={num_clients} each lacking missing={missing} of {num_classes} "
            f"classes, only {num_clients * held} class slots exist and some class would be held by "
            f"no client; use missing <= {max_missing} or more clients"
        )
    perm = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for k in range(num_clients):
        for j in range(held):
            holders[int(perm[(k * held + j) % num_classes])].append(k)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(inv == c))
        for k, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[k].append(chunk)
    return _finish([np.concatenate(p) for p in parts], "missing_classes")


def partition_by_group(groups: Any, num_clients: int) -> list[np.ndarray]:
    """Whole groups per client (e.g. HAR's subjects): the sorted distinct group ids are dealt
    round-robin, so client ``k`` gets groups ``k, k + K, k + 2K, ...``.

    Raises:
        DataError: no groups given, or more clients than groups.
    """
    if groups is None:
        raise DataError("partition scheme 'by_group' needs the dataset's group ids (e.g. HAR's subjects); this dataset has none")
    g = _as_targets(groups)
    num_clients = _check_int("num_clients", num_clients, 1)
    ids = np.unique(g)
    if num_clients > len(ids):
        raise DataError(f"partition scheme 'by_group': {num_clients} clients but only {len(ids)} groups; use at most {len(ids)} clients")
    parts = [np.flatnonzero(np.isin(g, ids[k::num_clients])) for k in range(num_clients)]
    return _finish(parts, "by_group")


# --------------------------------------------------------------------------------------------
# Front door
# --------------------------------------------------------------------------------------------

# scheme -> (optional options with defaults, required options)
_SCHEME_OPTIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "iid": ({}, ()),
    "shards": ({"shards_per_client": 2}, ()),
    "dirichlet": ({"min_size": 1, "max_tries": 1000, "balance": True}, ("beta",)),
    "dominant_label": ({}, ("dominant_fraction",)),
    "missing_classes": ({}, ("missing",)),
    "by_group": ({}, ()),
}

#: Scheme names accepted by :func:`make_partition`.
PARTITION_SCHEMES: tuple[str, ...] = tuple(_SCHEME_OPTIONS)


def partition_options(scheme: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``(optional options with their defaults, required options)`` of a partition scheme.

    Raises:
        DataError: an unknown scheme.
    """
    if scheme not in _SCHEME_OPTIONS:
        raise DataError(f"unknown partition scheme {scheme!r}; valid: {', '.join(PARTITION_SCHEMES)}")
    defaults, required = _SCHEME_OPTIONS[scheme]
    return dict(defaults), tuple(required)


def make_partition(
    scheme: str,
    targets: Any,
    num_clients: int,
    *,
    seed: int,
    local_test_fraction: float = 0.0,
    groups: Any = None,
    **options: Any,
) -> Partition:
    """Partition a training set among clients and carve out local test sets.

    Args:
        scheme: ``"iid"``, ``"shards"`` (option ``shards_per_client=2``), ``"dirichlet"``
            (``beta`` required; ``min_size=1``, ``max_tries=1000``, ``balance=True``),
            ``"dominant_label"``
            (``dominant_fraction`` required), ``"missing_classes"`` (``missing`` required) or
            ``"by_group"`` (whole groups per client, from ``groups``).
        targets: One integer label per training sample (numpy array, list or tensor).
        num_clients: Number of clients (>= 1).
        seed: Seed; the same arguments and seed always give the same partition.
        groups: One group id per training sample (``DatasetSplits.train_groups``), for
            ``"by_group"``; ignored by the other schemes.
        local_test_fraction: Fraction in ``[0, 1)`` of each client's indices moved to its local
            test set: ``floor(local_test_fraction * n_k)``, capped at ``n_k - 1`` so at least one
            training sample remains; chosen at random (not stratified).
        **options: The scheme's options listed above.

    Returns:
        The partition; client ``k``'s ``train`` and ``test`` are disjoint and together equal the
        scheme's indices for client ``k``.

    Raises:
        DataError: On an unknown scheme, unknown/missing/invalid option, or an impossible split.
    """
    if scheme not in _SCHEME_OPTIONS:
        raise DataError(f"unknown partition scheme {scheme!r}; valid schemes: {list(PARTITION_SCHEMES)}")
    defaults, required = _SCHEME_OPTIONS[scheme]
    valid = sorted(set(defaults) | set(required))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"unknown option(s) {unknown} for partition scheme {scheme!r}; valid options: "
            f"{valid or 'none'}"
        )
    absent = [r for r in required if r not in options]
    if absent:
        raise DataError(f"partition scheme {scheme!r} requires the option(s) {absent}")
    seed = _check_seed(seed)
    frac = _check_real("local_test_fraction", local_test_fraction)
    if not 0.0 <= frac < 1.0:
        raise DataError(f"local_test_fraction must be in [0, 1), got {local_test_fraction!r}")
    kwargs = {**defaults, **options}

    if scheme == "iid":
        y = _as_targets(targets)
        parts = partition_iid(len(y), num_clients, seed=seed)
    elif scheme == "shards":
        parts = partition_shards(targets, num_clients, seed=seed, **kwargs)
    elif scheme == "dirichlet":
        parts = partition_dirichlet(targets, num_clients, seed=seed, **kwargs)
    elif scheme == "dominant_label":
        parts = partition_dominant_label(targets, num_clients, seed=seed, **kwargs)
    elif scheme == "by_group":
        parts = partition_by_group(groups, num_clients)
    else:
        parts = partition_missing_classes(targets, num_clients, seed=seed, **kwargs)

    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    clients = []
    for idx in parts:
        n_test = min(int(math.floor(frac * len(idx))), len(idx) - 1)
        if n_test <= 0:
            clients.append(ClientSplit(train=idx, test=np.empty(0, dtype=np.int64)))
            continue
        shuffled = split_rng.permutation(idx)
        clients.append(ClientSplit(train=shuffled[n_test:], test=shuffled[:n_test]))
    partition = Partition(clients=tuple(clients))
    log.debug(
        "partition %s: %d clients, train sizes min %d / max %d",
        scheme,
        len(partition),
        min(partition.sizes()),
        max(partition.sizes()),
    )
    return partition
