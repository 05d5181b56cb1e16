"""Property tests for the partitioners in lightning_fedprune.data.partition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightning_fedprune.data import (
    PARTITION_SCHEMES,
    ClientSplit,
    Partition,
    make_partition,
    partition_dirichlet,
    partition_dominant_label,
    partition_iid,
    partition_missing_classes,
    partition_shards,
)
from lightning_fedprune.errors import DataError

torch.set_num_threads(1)

SEEDS = (0, 1, 7)


@pytest.fixture(scope="module")
def balanced() -> np.ndarray:
    """1,000 labels, 100 per class, in shuffled order."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))


@pytest.fixture(scope="module")
def digits_targets() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target.astype(np.int64)  # 1,797 labels, 174-183 per class


def assert_valid(parts: list[np.ndarray], num_samples: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert len(p) > 0, "every client must be non-empty"
        assert np.all(np.diff(p) > 0), "indices sorted and unique within a client"
    joined = np.concatenate(parts)
    assert len(joined) == num_samples, "disjoint: no index appears twice"
    np.testing.assert_array_equal(np.sort(joined), np.arange(num_samples))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def label_fractions(parts: list[np.ndarray], y: np.ndarray, num_classes: int = 10) -> np.ndarray:
    return np.stack([np.bincount(y[p], minlength=num_classes) / len(p) for p in parts])


# ---------------------------------------------------------------- iid


@pytest.mark.parametrize("num_clients", [1, 3, 10, 37])
def test_iid_properties(num_clients: int) -> None:
    for seed in SEEDS:
        parts = partition_iid(1000, num_clients, seed=seed)
        assert_valid(parts, 1000, num_clients)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert same(parts, partition_iid(1000, num_clients, seed=seed))
    if num_clients > 1:
        assert not same(partition_iid(1000, num_clients, seed=0), partition_iid(1000, num_clients, seed=1))


def test_iid_one_sample_per_client() -> None:
    parts = partition_iid(5, 5, seed=0)
    assert_valid(parts, 5, 5)


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize(("num_clients", "shards_per_client"), [(5, 2), (10, 2), (20, 2), (10, 3), (25, 2)])
def test_shards_properties(balanced: np.ndarray, num_clients: int, shards_per_client: int) -> None:
    for seed in SEEDS:
        parts = partition_shards(balanced, num_clients, shards_per_client=shards_per_client, seed=seed)
        assert_valid(parts, len(balanced), num_clients)
        again = partition_shards(balanced, num_clients, shards_per_client=shards_per_client, seed=seed)
        assert same(parts, again)
        # shards have near-equal sizes, so clients too
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= shards_per_client
        shard_size = len(balanced) / (num_clients * shards_per_client)
        if shard_size.is_integer() and 100 % shard_size == 0:  # no shard straddles two labels
            for p in parts:
                assert len(np.unique(balanced[p])) <= shards_per_client
    assert not same(
        partition_shards(balanced, num_clients, shards_per_client=shards_per_client, seed=0),
        partition_shards(balanced, num_clients, shards_per_client=shards_per_client, seed=1),
    )


def test_shards_on_digits_are_label_concentrated(digits_targets: np.ndarray) -> None:
    parts = partition_shards(digits_targets, 10, shards_per_client=2, seed=0)
    assert_valid(parts, len(digits_targets), 10)
    # a shard may straddle a label boundary on unbalanced labels, but each client stays narrow
    assert all(len(np.unique(digits_targets[p])) <= 4 for p in parts)


def test_shards_too_few_samples() -> None:
    with pytest.raises(DataError, match=r"num_clients \* shards_per_client = 20"):
        partition_shards(np.zeros(19, dtype=int), 10, shards_per_client=2, seed=0)


# ---------------------------------------------------------------- dirichlet


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 100.0])
@pytest.mark.parametrize("num_clients", [2, 5, 10])
def test_dirichlet_properties(digits_targets: np.ndarray, beta: float, num_clients: int) -> None:
    for seed in SEEDS:
        parts = partition_dirichlet(digits_targets, num_clients, beta=beta, seed=seed)
        assert_valid(parts, len(digits_targets), num_clients)
        assert same(parts, partition_dirichlet(digits_targets, num_clients, beta=beta, seed=seed))
    assert not same(
        partition_dirichlet(digits_targets, num_clients, beta=beta, seed=0),
        partition_dirichlet(digits_targets, num_clients, beta=beta, seed=1),
    )


def test_dirichlet_tiny_beta_is_skewed(digits_targets: np.ndarray) -> None:
    means = [
        label_fractions(partition_dirichlet(digits_targets, 10, beta=0.01, seed=s), digits_targets)
        .max(axis=1)
        .mean()
        for s in range(10)
    ]
    assert np.mean(means) > 0.75


def test_dirichlet_huge_beta_is_close_to_iid(digits_targets: np.ndarray) -> None:
    parts = partition_dirichlet(digits_targets, 10, beta=1e4, seed=0)
    fractions = label_fractions(parts, digits_targets)
    global_fractions = np.bincount(digits_targets) / len(digits_targets)
    assert np.abs(fractions - global_fractions).max() < 0.03
    sizes = [len(p) for p in parts]
    assert max(sizes) / min(sizes) < 1.2


def test_dirichlet_min_size(balanced: np.ndarray) -> None:
    for seed in SEEDS:
        parts = partition_dirichlet(balanced, 10, beta=0.3, seed=seed, min_size=40)
        assert_valid(parts, len(balanced), 10)
        assert min(len(p) for p in parts) >= 40


def test_dirichlet_impossible_raises(balanced: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"max_tries=20 .*larger beta"):
        partition_dirichlet(balanced, 50, beta=0.001, seed=0, max_tries=20)
    with pytest.raises(DataError, match="at least 200 sample"):
        partition_dirichlet(balanced, 10, beta=1.0, seed=0, min_size=200)


# ---------------------------------------------------------------- dominant label


@pytest.mark.parametrize("fraction", [0.5, 0.8])
@pytest.mark.parametrize("num_clients", [10, 20, 30])
def test_dominant_label_share_balanced(balanced: np.ndarray, fraction: float, num_clients: int) -> None:
    for seed in SEEDS:
        parts = partition_dominant_label(balanced, num_clients, dominant_fraction=fraction, seed=seed)
        assert_valid(parts, len(balanced), num_clients)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        tolerance = 0.02 + 1.5 / min(sizes)  # rounding to whole samples on small clients
        for k, p in enumerate(parts):
            share = np.mean(balanced[p] == k % 10)
            assert share == pytest.approx(fraction, abs=tolerance)
        again = partition_dominant_label(balanced, num_clients, dominant_fraction=fraction, seed=seed)
        assert same(parts, again)
    assert not same(
        partition_dominant_label(balanced, num_clients, dominant_fraction=fraction, seed=0),
        partition_dominant_label(balanced, num_clients, dominant_fraction=fraction, seed=1),
    )


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_dominant_label_share_digits(digits_targets: np.ndarray, fraction: float) -> None:
    for seed in SEEDS:
        parts = partition_dominant_label(digits_targets, 10, dominant_fraction=fraction, seed=seed)
        assert_valid(parts, len(digits_targets), 10)
        shares = [np.mean(digits_targets[p] == k) for k, p in enumerate(parts)]
        assert np.allclose(shares, fraction, atol=0.04)


def test_dominant_label_one_over_c_is_iid_like(balanced: np.ndarray) -> None:
    parts = partition_dominant_label(balanced, 10, dominant_fraction=0.1, seed=0)
    np.testing.assert_allclose(label_fractions(parts, balanced), 0.1, atol=0.011)


def test_dominant_label_extremes(balanced: np.ndarray) -> None:
    parts = partition_dominant_label(balanced, 10, dominant_fraction=1.0, seed=0)
    assert [np.unique(balanced[p]).tolist() for p in parts] == [[k] for k in range(10)]
    parts = partition_dominant_label(balanced, 10, dominant_fraction=0.0, seed=0)
    assert all(not np.any(balanced[p] == k) for k, p in enumerate(parts))


def test_dominant_label_uneven_counts_stay_covering(digits_targets: np.ndarray) -> None:
    for num_clients in (3, 7, 13, 101):
        parts = partition_dominant_label(digits_targets, num_clients, dominant_fraction=0.8, seed=0)
        assert_valid(parts, len(digits_targets), num_clients)


# ---------------------------------------------------------------- missing classes


@pytest.mark.parametrize(
    ("num_clients", "missing"), [(10, 0), (10, 1), (10, 5), (10, 9), (5, 3), (3, 6), (4, 7)]
)
def test_missing_classes_properties(balanced: np.ndarray, num_clients: int, missing: int) -> None:
    for seed in SEEDS:
        parts = partition_missing_classes(balanced, num_clients, missing=missing, seed=seed)
        assert_valid(parts, len(balanced), num_clients)
        held = [set(np.unique(balanced[p]).tolist()) for p in parts]
        assert all(len(h) == 10 - missing for h in held)
        assert set().union(*held) == set(range(10))
        for c in range(10):  # each class split evenly among its holders
            counts = [np.sum(balanced[p] == c) for p, h in zip(parts, held) if c in h]
            assert max(counts) - min(counts) <= 1
        assert same(parts, partition_missing_classes(balanced, num_clients, missing=missing, seed=seed))
    if missing:
        assert not same(
            partition_missing_classes(balanced, num_clients, missing=missing, seed=0),
            partition_missing_classes(balanced, num_clients, missing=missing, seed=1),
        )


def test_missing_classes_cannot_cover(balanced: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"use missing <= 6 or more clients"):
        partition_missing_classes(balanced, 3, missing=7, seed=0)
    with pytest.raises(DataError, match=r"0 <= missing < 10"):
        partition_missing_classes(balanced, 10, missing=10, seed=0)
    with pytest.raises(DataError, match=r"0 <= missing < 10"):
        partition_missing_classes(balanced, 10, missing=-1, seed=0)


# ---------------------------------------------------------------- make_partition


SCHEME_OPTIONS = {
    "iid": {},
    "shards": {"shards_per_client": 2},
    "dirichlet": {"beta": 0.5},
    "dominant_label": {"dominant_fraction": 0.5},
    "missing_classes": {"missing": 2},
}
DIRECT = {
    "iid": lambda y, k, s, o: partition_iid(len(y), k, seed=s),
    "shards": lambda y, k, s, o: partition_shards(y, k, seed=s, **o),
    "dirichlet": lambda y, k, s, o: partition_dirichlet(y, k, seed=s, **o),
    "dominant_label": lambda y, k, s, o: partition_dominant_label(y, k, seed=s, **o),
    "missing_classes": lambda y, k, s, o: partition_missing_classes(y, k, seed=s, **o),
}


def test_scheme_list() -> None:
    assert set(PARTITION_SCHEMES) == set(SCHEME_OPTIONS) | {"by_group"}  # by_group: tests/data/test_har.py


def test_make_partition_by_group_with_a_local_test_split(digits_targets: np.ndarray) -> None:
    groups = np.arange(len(digits_targets)) % 13
    partition = make_partition("by_group", digits_targets, 5, seed=3, local_test_fraction=0.2, groups=groups)
    for k, client in enumerate(partition.clients):
        both = np.concatenate([client.train, client.test])
        assert set(np.unique(groups[both])) == set(range(k, 13, 5))
        assert len(client.test) == math.floor(0.2 * len(both))


@pytest.mark.parametrize("scheme", sorted(SCHEME_OPTIONS))
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_make_partition_local_test_split(digits_targets: np.ndarray, scheme: str, fraction: float) -> None:
    opts = SCHEME_OPTIONS[scheme]
    partition = make_partition(scheme, digits_targets, 10, seed=3, local_test_fraction=fraction, **opts)
    assert isinstance(partition, Partition) and len(partition) == 10
    direct = DIRECT[scheme](digits_targets, 10, 3, opts)
    for client, idx in zip(partition.clients, direct):
        assert len(client.test) == math.floor(fraction * len(idx))
        assert len(np.intersect1d(client.train, client.test)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([client.train, client.test])), idx)
    assert partition.sizes() == [len(c.train) for c in partition.clients]
    assert partition.test_sizes() == [len(c.test) for c in partition.clients]
    assert partition == make_partition(scheme, torch.as_tensor(digits_targets), 10, seed=3,
                                       local_test_fraction=fraction, **opts)  # fmt: skip


def test_make_partition_keeps_one_train_sample() -> None:
    partition = make_partition("iid", np.arange(4) % 2, 4, seed=0, local_test_fraction=0.9)
    assert partition.sizes() == [1, 1, 1, 1] and partition.test_sizes() == [0, 0, 0, 0]
    partition = make_partition("iid", np.arange(20) % 2, 2, seed=0, local_test_fraction=0.99)
    assert partition.sizes() == [1, 1] and partition.test_sizes() == [9, 9]


def test_partition_json_round_trip(digits_targets: np.ndarray) -> None:
    partition = make_partition("dirichlet", digits_targets, 7, seed=1, local_test_fraction=0.25, beta=0.3)
    text = json.dumps(partition.to_json())
    restored = Partition.from_json(json.loads(text))
    assert restored == partition
    assert restored.sizes() == partition.sizes()
    for a, b in zip(restored.clients, partition.clients):
        assert a.train.dtype == np.int64 and a.test.dtype == np.int64
        np.testing.assert_array_equal(a.train, b.train)
        np.testing.assert_array_equal(a.test, b.test)


def test_client_split_is_sorted_and_read_only() -> None:
    split = ClientSplit(train=np.array([5, 1, 3]), test=[])
    np.testing.assert_array_equal(split.train, [1, 3, 5])
    assert split.test.dtype == np.int64 and len(split.test) == 0
    with pytest.raises(ValueError):
        split.train[0] = 9


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([1, 2], "must be an object"),
        ({"parts": []}, "must be an object"),
        ({"clients": [{"test": [1]}]}, r'clients\[0\] must be an object with "train"'),
        ({"clients": [{"train": [1.5]}]}, "integer indices"),
        ({"clients": [{"train": [-1]}]}, "non-negative"),
    ],
)
def test_from_json_rejects_bad_input(data: object, match: str) -> None:
    with pytest.raises(DataError, match=match):
        Partition.from_json(data)  # type: ignore[arg-type]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "random"}, r"unknown partition scheme 'random'; valid schemes: \['iid'"),
        ({"scheme": "iid", "beta": 0.5}, r"unknown option\(s\) \['beta'\] for partition scheme 'iid'"),
        ({"scheme": "shards", "shard": 2}, r"valid options: \['shards_per_client'\]"),
        ({"scheme": "dirichlet"}, r"requires the option\(s\) \['beta'\]"),
        ({"scheme": "dominant_label"}, r"requires the option\(s\) \['dominant_fraction'\]"),
        ({"scheme": "missing_classes"}, r"requires the option\(s\) \['missing'\]"),
        ({"scheme": "dirichlet", "beta": 0.0}, r"beta must be > 0, got 0.0"),
        ({"scheme": "dirichlet", "beta": -1}, r"beta must be > 0"),
        ({"scheme": "dirichlet", "beta": float("nan")}, r"beta must be finite"),
        ({"scheme": "dirichlet", "beta": "big"}, r"beta must be a number, got 'big'"),
        ({"scheme": "dominant_label", "dominant_fraction": 1.5}, r"dominant_fraction must be in \[0, 1\], got 1.5"),
        ({"scheme": "dominant_label", "dominant_fraction": -0.1}, r"dominant_fraction must be in \[0, 1\]"),
        ({"scheme": "missing_classes", "missing": 10}, r"0 <= missing < 10"),
        ({"scheme": "iid", "local_test_fraction": 1.0}, r"local_test_fraction must be in \[0, 1\), got 1.0"),
        ({"scheme": "iid", "local_test_fraction": -0.5}, r"local_test_fraction must be in \[0, 1\)"),
        ({"scheme": "iid", "num_clients": 0}, r"num_clients must be an integer >= 1, got 0"),
        ({"scheme": "iid", "num_clients": 2.5}, r"num_clients must be an integer >= 1, got 2.5"),
        ({"scheme": "iid", "num_clients": 1001}, r"num_clients=1001 clients .* use num_clients <= 1000"),
        ({"scheme": "dominant_label", "dominant_fraction": 0.5, "num_clients": 1001}, r"num_clients <= 1000"),
        ({"scheme": "iid", "seed": -1}, r"seed must be a non-negative integer, got -1"),
        ({"scheme": "iid", "seed": None}, r"seed must be a non-negative integer, got None"),
        ({"scheme": "shards", "shards_per_client": 0}, r"shards_per_client must be an integer >= 1, got 0"),
    ],
)
def test_make_partition_rejects_bad_input(balanced: np.ndarray, kwargs: dict, match: str) -> None:
    kwargs = dict(kwargs)
    scheme = kwargs.pop("scheme")
    num_clients = kwargs.pop("num_clients", 10)
    kwargs.setdefault("seed", 0)
    with pytest.raises(DataError, match=match):
        make_partition(scheme, balanced, num_clients, **kwargs)


@pytest.mark.parametrize(
    ("targets", "match"),
    [
        (np.zeros((4, 2), dtype=int), r"1-D sequence of integer labels, got shape \(4, 2\)"),
        (np.array([0.0, 1.0, 1.0]), "integer class labels, got dtype float64"),
        (np.array([], dtype=int), "targets is empty"),
    ],
)
def test_bad_targets(targets: np.ndarray, match: str) -> None:
    for fn in (
        lambda: partition_shards(targets, 1, seed=0),
        lambda: partition_dirichlet(targets, 1, beta=1.0, seed=0),
        lambda: partition_dominant_label(targets, 1, dominant_fraction=0.5, seed=0),
        lambda: partition_missing_classes(targets, 1, missing=0, seed=0),
    ):
        with pytest.raises(DataError, match=match):
            fn()


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        partition_iid(3, 4, seed=0)
