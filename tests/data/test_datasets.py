"""Tests of lightning_fedprune.data.datasets: built-in digits, real data under ../shared/data,
synthetic PTB files and the error messages for missing files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_fedprune.data import (
    DATA_ROOT_ENV,
    DatasetSplits,
    available_datasets,
    clear_dataset_cache,
    default_data_root,
    load_dataset,
)
from lightning_fedprune.errors import DataError

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent")
    return SHARED


@pytest.fixture(scope="module", autouse=True)
def _free_cache():
    yield
    clear_dataset_cache()  # release the large tensors once this module is done


# ---------------------------------------------------------------- registry / digits


def test_available_datasets() -> None:
    names = available_datasets()
    assert names == sorted(names)
    assert {
        "digits", "mnist", "fashion_mnist", "fashion_mnist_resplit",
        "emnist", "cifar10", "cifar10_subset", "ptb",
    } <= set(names)  # fmt: skip


def test_digits_splits() -> None:
    ds = load_dataset("digits")
    assert isinstance(ds, DatasetSplits)
    assert (ds.name, ds.task, ds.num_classes, ds.input_shape) == ("digits", "classification", 10, (64,))
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    x, y = ds.train.tensors
    assert x.dtype == torch.float32 and x.shape == (1437, 64)
    assert y.dtype == torch.int64 and y.shape == (1437,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert ds.test.tensors[0].shape == (360, 64)
    assert torch.equal(ds.train_targets, y)
    assert torch.equal(ds.test_targets, ds.test.tensors[1])
    # stratified: every class keeps ~20% of its samples in test
    all_counts = torch.bincount(torch.cat([y, ds.test.tensors[1]]), minlength=10)
    test_counts = torch.bincount(ds.test.tensors[1], minlength=10)
    assert torch.all((test_counts.float() / all_counts - 0.2).abs() < 0.01)
    # train and test are disjoint images (digits has a handful of duplicate images, so compare rows)
    train_rows = {tuple(r) for r in ds.train.tensors[0].tolist()}
    assert sum(tuple(r) in train_rows for r in ds.test.tensors[0].tolist()) < 10


def test_digits_memoised_and_seeded() -> None:
    a = load_dataset("digits")
    assert load_dataset("digits") is a
    assert load_dataset("digits", seed=0, test_fraction=0.2) is a  # defaults are part of the key
    assert load_dataset("Digits", root="/ignored") is a
    b = load_dataset("digits", seed=1)
    assert b is not a
    assert not torch.equal(a.train.tensors[1], b.train.tensors[1])
    c = load_dataset("digits", test_fraction=0.5)
    assert (len(c.train), len(c.test)) == (898, 899)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("imagenet", {}, r"unknown dataset 'imagenet'; available datasets: \[.*'digits'"),
        ("digits", {"seq_len": 3}, r"unknown option\(s\) \['seq_len'\] for dataset 'digits'; valid options: \['test_fraction', 'seed'\]"),
        ("digits", {"test_fraction": 1.5}, r"'test_fraction' of dataset 'digits' must be a number strictly between 0 and 1, got 1.5"),
        ("digits", {"seed": -3}, r"'seed' of dataset 'digits' must be an integer >= 0, got -3"),
        ("digits", {"test_fraction": 0.001}, r"cannot split 'digits' with test_fraction=0.001"),
        ("mnist", {"split": "x"}, r"unknown option\(s\) \['split'\] for dataset 'mnist'; valid options: none"),
    ],
)  # fmt: skip
def test_bad_arguments(name: str, options: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(name, **options)


def test_bad_download_flag() -> None:
    with pytest.raises(DataError, match="download must be True or False"):
        load_dataset("digits", download="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- data root resolution


def test_default_data_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    expected = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with pytest.raises(DataError, match=re.escape(str(expected))):
        load_dataset("mnist")


def test_default_data_root_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    root = default_data_root()
    if SHARED.is_dir():
        assert root == SHARED.resolve()  # found next to the repository
    else:
        assert root is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()  # cwd/../shared/data


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("mnist", {}, "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", {}, "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
        ("emnist", {}, "EMNIST/raw/emnist-balanced-train-images-idx3-ubyte"),
        ("emnist", {"split": "letters"}, "EMNIST/raw/emnist-letters-test-labels-idx1-ubyte"),
        ("cifar10", {}, "cifar-10-batches-py/data_batch_1"),
        ("fashion_mnist_resplit", {}, "FashionMNIST-resplit/raw/train-images-idx3-ubyte"),
        ("cifar10_subset", {}, "CIFAR10-subset/cifar10_subset.npz"),
        ("ptb", {}, "PTB/ptb.train.txt"),
        ("ptb", {"test_split": "valid"}, "PTB/ptb.valid.txt"),
    ],
)
def test_missing_files_name_expected_paths(tmp_path: Path, name: str, options: dict, expected: str) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / expected))) as info:
        load_dataset(name, root=tmp_path, **options)
    message = str(info.value)
    assert "root=" in message
    if name in ("mnist", "fashion_mnist", "emnist", "cifar10"):
        assert "download=True" in message


def test_download_without_network_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    def offline(self) -> None:  # what torchvision raises when every mirror fails
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    match = r"(?s)downloading failed \(is a network available\?\).*MNIST/raw/train-images"
    with pytest.raises(DataError, match=match):
        load_dataset("mnist", root=tmp_path, download=True)


def test_bad_emnist_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'split' of dataset 'emnist' must be one of \['byclass'"):
        load_dataset("emnist", root=tmp_path, split="greek")


def test_cifar10_subset_missing_arrays(tmp_path: Path) -> None:
    folder = tmp_path / "CIFAR10-subset"
    folder.mkdir()
    np.savez(folder / "cifar10_subset.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(DataError, match=r"lacks the arrays \['x_test', 'y_test', 'classes'\]"):
        load_dataset("cifar10_subset", root=tmp_path)


def test_cifar10_subset_small_file(tmp_path: Path) -> None:
    folder = tmp_path / "CIFAR10-subset"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(
        folder / "cifar10_subset.npz",
        x_train=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 0, 1, 2], np.uint8),
        x_test=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
        y_test=np.array([2, 1, 0], np.uint8),
        classes=np.array(["a", "b", "c"]),
    )
    ds = load_dataset("cifar10_subset", root=tmp_path)
    assert ds.train.tensors[0].shape == (6, 3, 32, 32) and ds.num_classes == 3
    assert ds.labels == ("a", "b", "c")
    # channel-first layout: pixel (0, 0) of image 0, channel 1 matches the HWC source
    raw = np.load(folder / "cifar10_subset.npz")["x_train"][0, 0, 0, 1] / 255.0
    assert float(ds.train.tensors[0][0, 1, 0, 0]) == pytest.approx((raw - 0.4822) / 0.2435, abs=1e-5)


# ---------------------------------------------------------------- PTB on small synthetic files


def write_ptb(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ptb.train.txt").write_text(" the cat sat \n the dog <unk> ran \n")
    (folder / "ptb.valid.txt").write_text(" the cat ran \n")
    (folder / "ptb.test.txt").write_text(" a bird sat \n the cat \n")


def test_ptb_preprocessing_on_small_files(tmp_path: Path) -> None:
    write_ptb(tmp_path / "PTB")
    ds = load_dataset("ptb", root=tmp_path, seq_len=3)
    assert ds.labels == ("the", "cat", "sat", "<eos>", "dog", "<unk>", "ran")  # first appearance
    assert (ds.num_classes, ds.task, ds.input_shape) == (7, "language_model", (3,))
    # train stream: the cat sat <eos> the dog <unk> ran <eos> -> 9 tokens -> (9-1)//3 = 2 sequences
    stream = [0, 1, 2, 3, 0, 4, 5, 6, 3]
    x, y = ds.train.tensors
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.tolist() == [stream[0:3], stream[3:6]]
    assert y.tolist() == [stream[1:4], stream[4:7]]
    assert torch.equal(ds.train_targets, y[:, 0])
    # test: a bird sat <eos> the cat <eos>; "a" and "bird" are not in the vocabulary -> <unk>
    assert ds.test.tensors[0].tolist() == [[5, 5, 2], [3, 0, 1]]
    assert ds.test.tensors[1].tolist() == [[5, 2, 3], [0, 1, 3]]
    valid = load_dataset("ptb", root=tmp_path, seq_len=2, test_split="valid")
    assert valid.test.tensors[0].tolist() == [[0, 1]] and valid.test.tensors[1].tolist() == [[1, 6]]


def test_ptb_root_may_be_the_folder_itself(tmp_path: Path) -> None:
    write_ptb(tmp_path / "corpus")
    ds = load_dataset("ptb", root=tmp_path / "corpus", seq_len=4)
    assert len(ds.train) == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"seq_len": 0}, r"'seq_len' of dataset 'ptb' must be an integer >= 1, got 0"),
        ({"seq_len": 2.5}, r"'seq_len' of dataset 'ptb' must be an integer >= 1, got 2.5"),
        ({"test_split": "train"}, r"'test_split' of dataset 'ptb' must be one of \['test', 'valid'\], got 'train'"),
        ({"seq_len": 50}, r"too few for one sequence of seq_len=50"),
    ],
)
def test_ptb_bad_options(tmp_path: Path, options: dict, match: str) -> None:
    write_ptb(tmp_path / "PTB")
    with pytest.raises(DataError, match=match):
        load_dataset("ptb", root=tmp_path, **options)


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.fixture(scope="module")
def mnist() -> DatasetSplits:
    return load_dataset("mnist", root=shared_or_skip("MNIST", "raw"))


@pytest.fixture(scope="module")
def fmnist_resplit() -> DatasetSplits:
    return load_dataset("fashion_mnist_resplit", root=shared_or_skip("FashionMNIST-resplit", "raw"))


@pytest.fixture(scope="module")
def cifar_subset() -> DatasetSplits:
    return load_dataset("cifar10_subset", root=shared_or_skip("CIFAR10-subset", "cifar10_subset.npz"))


@pytest.fixture(scope="module")
def ptb() -> DatasetSplits:
    return load_dataset("ptb", root=shared_or_skip("PTB", "ptb.train.txt"))


def test_mnist(mnist: DatasetSplits) -> None:
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert (mnist.num_classes, mnist.input_shape, mnist.task) == (10, (1, 28, 28), "classification")
    x = mnist.train.tensors[0]
    assert x.dtype == torch.float32 and x.shape == (60000, 1, 28, 28)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1.0) < 1e-3  # normalised with 0.1307/0.3081
    assert mnist.train_targets.dtype == torch.int64
    assert torch.bincount(mnist.train_targets).tolist()[:2] == [5923, 6742]
    assert load_dataset("mnist", root=SHARED) is mnist  # memoised


def test_mnist_default_root(mnist: DatasetSplits, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    if default_data_root() != SHARED.resolve():
        pytest.skip("default data root does not resolve to ../shared/data here")
    assert load_dataset("mnist") is mnist


def test_fashion_mnist_resplit(fmnist_resplit: DatasetSplits) -> None:
    assert (len(fmnist_resplit.train), len(fmnist_resplit.test)) == (60000, 10000)
    assert fmnist_resplit.input_shape == (1, 28, 28) and fmnist_resplit.num_classes == 10
    assert torch.bincount(fmnist_resplit.train_targets).tolist() == [6000] * 10
    assert torch.bincount(fmnist_resplit.test_targets).tolist() == [1000] * 10
    x = fmnist_resplit.test.tensors[0]
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


def test_cifar10_subset(cifar_subset: DatasetSplits) -> None:
    assert (len(cifar_subset.train), len(cifar_subset.test)) == (10000, 2000)
    assert cifar_subset.input_shape == (3, 32, 32) and cifar_subset.num_classes == 10
    assert cifar_subset.train.tensors[0].shape == (10000, 3, 32, 32)
    assert torch.bincount(cifar_subset.train_targets).tolist() == [1000] * 10
    assert torch.bincount(cifar_subset.test_targets).tolist() == [200] * 10
    assert cifar_subset.labels is not None and cifar_subset.labels[0] == "airplane"
    channel_means = cifar_subset.train.tensors[0].mean(dim=(0, 2, 3))
    assert torch.all(channel_means.abs() < 0.05)


def test_ptb(ptb: DatasetSplits) -> None:
    train_tokens = 929_589  # 887,521 words + 42,068 <eos>
    assert ptb.num_classes == 10_000 and ptb.task == "language_model" and ptb.input_shape == (35,)
    assert len(ptb.train) == (train_tokens - 1) // 35 == 26_559
    assert len(ptb.test) == (82_430 - 1) // 35
    x, y = ptb.train.tensors
    assert x.shape == (26_559, 35) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:-1, -1], x[1:, 0])  # shifted by one
    assert ptb.labels is not None and ptb.labels[0] == "aer"
    assert "<eos>" in ptb.labels and "<unk>" in ptb.labels
    assert int(x.max()) < 10_000
    valid = load_dataset("ptb", root=SHARED, test_split="valid")
    assert len(valid.test) == (73_760 - 1) // 35
    assert valid.train is not ptb.train and torch.equal(valid.train.tensors[0], x)
