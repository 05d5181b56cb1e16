"""Datasets as in-memory tensors, looked up by name.

Every dataset is returned as a :class:`DatasetSplits`: a train and a test
:class:`~torch.utils.data.TensorDataset` whose inputs are already converted to ``float32`` and
normalised (or ``int64`` token ids for language modelling), plus the metadata a model builder
needs (number of classes, input shape, task).

The default dataset, ``digits``, ships with scikit-learn and never needs a file or a network.
Every other dataset reads files from a data root: the ``root`` argument, else
:func:`default_data_root` (``$LIGHTNING_FEDPRUNE_DATA`` or a ``shared/data`` folder next to the
repository). torchvision datasets use torchvision's own folder layout and can be downloaded with
``download=True`` when a network is available.

Loaded datasets are memoised per ``(name, root, options)`` for the life of the process, so two calls
with the same arguments return the *same* :class:`DatasetSplits` object. Treat its tensors as
read-only: modifying them in place would change what later callers receive.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_fedprune.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "DATA_ROOT_ENV",
    "DatasetSplits",
    "available_datasets",
    "clear_dataset_cache",
    "default_data_root",
    "load_dataset",
    "register_dataset",
]

#: Environment variable naming the data root used when ``root=None``.
DATA_ROOT_ENV = "LIGHTNING_FEDPRUNE_DATA"
#: how to name a data folder, in code, in a recipe and on the command line
_ROOT_HINT = "root=<folder> (a recipe's `data.root`; on the command line `--set data.root=<folder>`)"

_TASKS = ("classification", "language_model")


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test sets as in-memory tensors.

    Attributes:
        name: Registered dataset name (e.g. ``"mnist"``).
        train: Training set. For classification: ``(inputs float32, targets int64)``; for language
            modelling: ``(inputs int64 (N, seq_len), targets int64 (N, seq_len))``.
        test: Test set, same layout as ``train``.
        num_classes: Number of classes; for a language model, the vocabulary size.
        input_shape: Shape of one input sample, e.g. ``(1, 28, 28)``, ``(64,)`` or ``(35,)``.
        task: ``"classification"`` or ``"language_model"``.
        labels: Class names (index = class id) or, for a language model, the vocabulary
            (index = token id); ``None`` when unknown.
        train_groups: One group id per training sample when the data has a natural owner (HAR's
            subject ids), for the ``by_group`` partition; ``None`` otherwise.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    task: str
    labels: tuple[str, ...] | None = field(default=None, repr=False, compare=False)
    train_groups: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.task not in _TASKS:
            raise DataError(f"task must be one of {list(_TASKS)}, got {self.task!r}")

    @property
    def train_targets(self) -> torch.Tensor:
        """One ``int64`` label per training sample, for partitioners.

        For a language model this is the first target token of each sequence.
        """
        targets = self.train.tensors[1]
        return targets[:, 0] if targets.dim() > 1 else targets

    @property
    def test_targets(self) -> torch.Tensor:
        """One ``int64`` label per test sample (first target token for a language model)."""
        targets = self.test.tensors[1]
        return targets[:, 0] if targets.dim() > 1 else targets


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Loader = Callable[..., DatasetSplits]


@dataclass(frozen=True)
class _Entry:
    fn: Loader
    needs_root: bool
    signature: inspect.Signature


_REGISTRY: dict[str, _Entry] = {}
_CACHE: dict[tuple[Any, ...], DatasetSplits] = {}
_CACHE_LOCK = threading.Lock()


def register_dataset(name: str, *, needs_root: bool = True) -> Callable[[Loader], Loader]:
    """Register a dataset loader under ``name`` (decorator).

    The loader is called as ``fn(root, download, **options)`` where ``root`` is a resolved
    :class:`~pathlib.Path` (or ``None`` when ``needs_root`` is false) and every option is a
    keyword-only parameter with a default; those parameters define the options
    :func:`load_dataset` accepts for this dataset.

    Args:
        name: Name to register, lower case.
        needs_root: Whether the loader reads files under a data root.

    Returns:
        The decorator, which returns the loader unchanged.

    Raises:
        DataError: If ``name`` is already registered.
    """

    def decorator(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise DataError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = _Entry(fn=fn, needs_root=needs_root, signature=inspect.signature(fn))
        return fn

    return decorator


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted.

    Returns:
        The registered dataset names.
    """
    return sorted(_REGISTRY)


def dataset_description(name: str) -> str:
    """The first paragraph of the loader's docstring of dataset ``name`` (what it is, where it is read from).

    Raises:
        DataError: an unknown name.
    """
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(available_datasets())}")
    return " ".join((inspect.getdoc(_REGISTRY[name].fn) or "").split("\n\n")[0].split())


def clear_dataset_cache() -> None:
    """Forget every memoised dataset, so the next :func:`load_dataset` call reads files again."""
    with _CACHE_LOCK:
        _CACHE.clear()


def default_data_root() -> Path | None:
    """The data root used when ``load_dataset(..., root=None)``.

    Looked up in this order:

    1. ``$LIGHTNING_FEDPRUNE_DATA`` if set and non-empty (returned even if it does not exist, so
       the loader's error names it);
    2. ``../shared/data`` relative to the current working directory, if it is a directory;
    3. ``shared/data`` next to the repository root (the parent of the package directory), if it
       is a directory.

    Returns:
        The data root, or ``None`` if none of the above applies.
    """
    env = os.environ.get(DATA_ROOT_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / ".." / "shared" / "data", repo_root.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    **options: Any,
) -> DatasetSplits:
    """Load a registered dataset as in-memory tensors.

    Args:
        name: Dataset name; see :func:`available_datasets` (``digits``, ``mnist``,
            ``fashion_mnist``, ``fashion_mnist_resplit``, ``emnist``, ``cifar10``,
            ``cifar10_subset``, ``ptb``).
        root: Folder holding the dataset's files in the layout documented for that dataset
            (torchvision's layout for the torchvision datasets). ``None`` uses
            :func:`default_data_root`. Ignored by ``digits``.
        download: Let torchvision download missing files into ``root`` (needs a network).
        **options: Dataset-specific options, e.g. ``seed``/``test_fraction`` for ``digits``,
            ``split`` for ``emnist``, ``seq_len``/``test_split`` for ``ptb``.

    Returns:
        The dataset's splits. Repeated calls with equal arguments return the same object.

    Raises:
        DataError: If the name or an option is unknown or invalid, or the files are missing or
            unreadable.
    """
    if not isinstance(name, str):
        raise DataError(f"name must be a dataset name string, got {type(name).__name__}")
    key_name = name.strip().lower().replace("-", "_")
    entry = _REGISTRY.get(key_name)
    if entry is None:
        raise DataError(f"unknown dataset {name!r}; available datasets: {available_datasets()}")
    if not isinstance(download, bool):
        raise DataError(f"download must be True or False, got {download!r}")

    valid = [
        p.name for p in entry.signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"unknown option(s) {unknown} for dataset {key_name!r}; valid options: {valid or 'none'}"
        )
    bound = entry.signature.bind_partial(**options)
    bound.apply_defaults()
    full_options = {k: bound.arguments[k] for k in valid}

    resolved_root: Path | None = None
    if entry.needs_root:
        if root is None:
            resolved_root = default_data_root()
            if resolved_root is None:
                raise DataError(
                    f"dataset {key_name!r} needs a data folder: pass {_ROOT_HINT} (and "
                    f"download=True to fetch torchvision datasets when a network is available) "
                    f"or set ${DATA_ROOT_ENV}; the built-in 'digits' dataset needs no files"
                )
        else:
            try:
                resolved_root = Path(root).expanduser()
            except TypeError as exc:
                raise DataError(f"root must be a path or None, got {root!r}") from exc
        resolved_root = resolved_root.resolve()

    key: tuple[Any, ...] | None = (
        key_name,
        str(resolved_root) if resolved_root is not None else None,
        tuple(sorted(full_options.items())),
    )
    try:
        hash(key)
    except TypeError:
        key = None
    if key is not None:
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
        if cached is not None:
            log.debug("dataset %r served from the in-process cache", key_name)
            return cached

    splits = entry.fn(resolved_root, download, **full_options)
    log.info(
        "loaded dataset %r: %d train / %d test samples, %d classes, input shape %s",
        key_name,
        len(splits.train),
        len(splits.test),
        splits.num_classes,
        splits.input_shape,
    )
    if key is not None:
        with _CACHE_LOCK:
            splits = _CACHE.setdefault(key, splits)
    return splits


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _normalise_images(images: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,H,W,C) -> normalised float32 (N,C,H,W)."""
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        x = x.permute(0, 3, 1, 2)
    else:
        raise DataError(f"expected images of shape (N,H,W) or (N,H,W,C), got {tuple(x.shape)}")
    x = x.to(torch.float32).div_(255.0).contiguous()
    channels = x.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"normalisation has {len(mean)} channels but the images have {channels}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _as_long(targets: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1).clone()


def _check_files(dataset: str, root: Path, files: list[Path], *, download_hint: bool) -> None:
    missing = [p for p in files if not p.is_file()]
    if not missing:
        return
    expected = "\n  ".join(str(p) for p in files)
    layout = files[0].relative_to(root).as_posix()
    hint = f"Pass {_ROOT_HINT} such that <folder>/{layout} exists, or set ${DATA_ROOT_ENV}"
    hint += (
        "; download=True fetches the files into root when a network is available."
        if download_hint
        else "; this dataset cannot be downloaded automatically."
    )
    raise DataError(
        f"dataset {dataset!r} not found: missing {len(missing)} of the expected files:\n  "
        f"{expected}\n{hint}"
    )


def _check_int_option(dataset: str, option: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(
            f"option {option!r} of dataset {dataset!r} must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def _torchvision_splits(
    dataset: str,
    cls: type,
    root: Path,
    download: bool,
    expected: list[Path],
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Instantiate a torchvision dataset's train and test sets, turning errors into DataError."""
    if not download:
        _check_files(dataset, root, expected, download_hint=True)
    try:
        train = cls(root=str(root), train=True, download=download, **kwargs)
        test = cls(root=str(root), train=False, download=download, **kwargs)
    except (RuntimeError, OSError) as exc:
        expected_txt = "\n  ".join(str(p) for p in expected)
        if download:
            action = "downloading failed (is a network available?)"
            hint = "Without a network, place the files there by hand."
        else:
            action = "the files could not be read"
            hint = "Replace damaged files, or pass download=True to fetch them when a network is available."
        raise DataError(
            f"could not load dataset {dataset!r} from {root}: {action}: {exc}\n"
            f"torchvision expects the files:\n  {expected_txt}\n{hint}"
        ) from exc
    return train, test


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _mnist_like(
    dataset: str, cls_name: str, root: Path, download: bool, mean: float, std: float
) -> DatasetSplits:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    expected = [root / cls_name / "raw" / f for f in _IDX_FILES]
    train, test = _torchvision_splits(dataset, cls, root, download, expected)
    return DatasetSplits(
        name=dataset,
        train=TensorDataset(_normalise_images(train.data, (mean,), (std,)), _as_long(train.targets)),
        test=TensorDataset(_normalise_images(test.data, (mean,), (std,)), _as_long(test.targets)),
        num_classes=len(train.classes),
        input_shape=(1, 28, 28),
        task="classification",
        labels=tuple(str(c) for c in train.classes),
    )


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@register_dataset("digits", needs_root=False)
def _load_digits(
    root: Path | None, download: bool, *, test_fraction: float = 0.2, seed: int = 0
) -> DatasetSplits:
    """scikit-learn's 8x8 digits (1,797 images), flattened to 64 features in [0, 1].

    Stratified, seeded split via ``sklearn.model_selection.train_test_split``; the default
    ``test_fraction=0.2`` gives 1,437 train / 360 test samples.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 < float(test_fraction) < 1.0
    ):
        raise DataError(
            f"option 'test_fraction' of dataset 'digits' must be a number strictly between 0 and 1, "
            f"got {test_fraction!r}"
        )
    seed = _check_int_option("digits", "seed", seed, 0)
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    try:
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=float(test_fraction), random_state=seed, stratify=y
        )
    except ValueError as exc:
        raise DataError(
            f"cannot split 'digits' with test_fraction={test_fraction!r}: {exc}; "
            "use a test_fraction that leaves at least one sample per class on both sides"
        ) from exc
    return DatasetSplits(
        name="digits",
        train=TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        input_shape=(64,),
        task="classification",
        labels=tuple(str(i) for i in range(10)),
    )


@register_dataset("mnist")
def _load_mnist(root: Path, download: bool) -> DatasetSplits:
    """MNIST from ``<root>/MNIST/raw/`` (torchvision layout), normalised with 0.1307/0.3081."""
    return _mnist_like("mnist", "MNIST", root, download, 0.1307, 0.3081)


@register_dataset("fashion_mnist")
def _load_fashion_mnist(root: Path, download: bool) -> DatasetSplits:
    """Fashion-MNIST from ``<root>/FashionMNIST/raw/``, normalised with 0.2860/0.3530."""
    return _mnist_like("fashion_mnist", "FashionMNIST", root, download, 0.2860, 0.3530)


_EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


@register_dataset("emnist")
def _load_emnist(root: Path, download: bool, *, split: str = "balanced") -> DatasetSplits:
    """EMNIST from ``<root>/EMNIST/raw/``, normalised with 0.1751/0.3332.

    Images are kept exactly as torchvision returns them (EMNIST's raw files store them
    transposed); ``num_classes`` is ``len(classes)`` (27 for ``letters``, whose labels are 1-26).
    """
    import torchvision.datasets as tvd

    if split not in _EMNIST_SPLITS:
        raise DataError(
            f"option 'split' of dataset 'emnist' must be one of {list(_EMNIST_SPLITS)}, got {split!r}"
        )
    raw = root / "EMNIST" / "raw"
    expected = [
        raw / f"emnist-{split}-{part}-{kind}-idx{dim}-ubyte"
        for part in ("train", "test")
        for kind, dim in (("images", 3), ("labels", 1))
    ]
    train, test = _torchvision_splits("emnist", tvd.EMNIST, root, download, expected, split=split)
    mean, std = (0.1751,), (0.3332,)
    return DatasetSplits(
        name="emnist",
        train=TensorDataset(_normalise_images(train.data, mean, std), _as_long(train.targets)),
        test=TensorDataset(_normalise_images(test.data, mean, std), _as_long(test.targets)),
        num_classes=len(train.classes),
        input_shape=(1, 28, 28),
        task="classification",
        labels=tuple(str(c) for c in train.classes),
    )


_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@register_dataset("cifar10")
def _load_cifar10(root: Path, download: bool) -> DatasetSplits:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (torchvision layout), per-channel normalised."""
    import torchvision.datasets as tvd

    folder = root / tvd.CIFAR10.base_folder
    expected = [folder / f for f, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list]
    expected.append(folder / tvd.CIFAR10.meta["filename"])
    train, test = _torchvision_splits("cifar10", tvd.CIFAR10, root, download, expected)
    return DatasetSplits(
        name="cifar10",
        train=TensorDataset(
            _normalise_images(train.data, _CIFAR10_MEAN, _CIFAR10_STD), _as_long(train.targets)
        ),
        test=TensorDataset(
            _normalise_images(test.data, _CIFAR10_MEAN, _CIFAR10_STD), _as_long(test.targets)
        ),
        num_classes=10,
        input_shape=(3, 32, 32),
        task="classification",
        labels=tuple(str(c) for c in train.classes),
    )


_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


@register_dataset("fashion_mnist_resplit")
def _load_fashion_mnist_resplit(root: Path, download: bool) -> DatasetSplits:
    """Fashion-MNIST re-split: the four IDX files under ``<root>/FashionMNIST-resplit/raw/``.

    The files hold all 70,000 images re-split into train (``train-*``) and test (``t10k-*``);
    they are loaded as given and normalised like Fashion-MNIST (0.2860/0.3530). There is no
    download source for this layout.
    """
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = root / "FashionMNIST-resplit" / "raw"
    files = [raw / f for f in _IDX_FILES]
    _check_files("fashion_mnist_resplit", root, files, download_hint=False)
    if download:
        log.warning("fashion_mnist_resplit cannot be downloaded; download=True is ignored")
    try:
        x_tr, y_tr, x_te, y_te = (
            read_image_file(str(files[0])),
            read_label_file(str(files[1])),
            read_image_file(str(files[2])),
            read_label_file(str(files[3])),
        )
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        raise DataError(f"could not parse the IDX files under {raw}: {exc}") from exc
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataError(f"image and label counts differ in the IDX files under {raw}")
    mean, std = (0.2860,), (0.3530,)
    return DatasetSplits(
        name="fashion_mnist_resplit",
        train=TensorDataset(_normalise_images(x_tr, mean, std), _as_long(y_tr)),
        test=TensorDataset(_normalise_images(x_te, mean, std), _as_long(y_te)),
        num_classes=10,
        input_shape=(1, 28, 28),
        task="classification",
        labels=_FASHION_MNIST_CLASSES,
    )


@register_dataset("cifar10_subset")
def _load_cifar10_subset(root: Path, download: bool) -> DatasetSplits:
    """Class-balanced CIFAR-10 subset from ``<root>/CIFAR10-subset/cifar10_subset.npz``.

    The archive holds ``x_train`` (N,32,32,3) uint8, ``y_train``, ``x_test``, ``y_test`` and
    ``classes``; images are normalised with the CIFAR-10 per-channel mean/std. There is no
    download source for this file.
    """
    path = root / "CIFAR10-subset" / "cifar10_subset.npz"
    _check_files("cifar10_subset", root, [path], download_hint=False)
    if download:
        log.warning("cifar10_subset cannot be downloaded; download=True is ignored")
    keys = ("x_train", "y_train", "x_test", "y_test", "classes")
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = set(npz.files)
            arrays = {k: npz[k] for k in keys if k in present}
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks the arrays {missing}; expected arrays {list(keys)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
            raise DataError(
                f"{path}: x_{split} must have shape (N,32,32,3) with one y_{split} label per image, "
                f"got x_{split} {x.shape} and y_{split} {y.shape}"
            )
    classes = tuple(str(c) for c in arrays["classes"].tolist())
    return DatasetSplits(
        name="cifar10_subset",
        train=TensorDataset(
            _normalise_images(arrays["x_train"], _CIFAR10_MEAN, _CIFAR10_STD),
            _as_long(arrays["y_train"]),
        ),
        test=TensorDataset(
            _normalise_images(arrays["x_test"], _CIFAR10_MEAN, _CIFAR10_STD),
            _as_long(arrays["y_test"]),
        ),
        num_classes=len(classes) or 10,
        input_shape=(3, 32, 32),
        task="classification",
        labels=classes or None,
    )


@register_dataset("har")
def _load_har(root: Path, download: bool) -> DatasetSplits:
    """Human activity recognition windows from ``<root>/HAR/har_windows.npz``.

    The archive holds ``x_train`` (N, 9, 128) float32 sensor windows (body acceleration, body
    gyroscope, total acceleration; x, y, z each), ``y_train`` (activities 0..5), ``subject_train``
    (1..30) and the same for ``test``, plus ``classes``. Each channel is standardized with the
    training set's mean and standard deviation. The subject ids are ``train_groups``: the
    ``by_group`` partition gives each client whole subjects. There is no download source.
    """
    path = root / "HAR" / "har_windows.npz"
    _check_files("har", root, [path], download_hint=False)
    if download:
        log.warning("har cannot be downloaded; download=True is ignored")
    keys = ("x_train", "y_train", "subject_train", "x_test", "y_test", "classes")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in keys if k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks the arrays {missing}; expected arrays {list(keys)}")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for split, x in (("train", x_train), ("test", x_test)):
        if x.ndim != 3 or len(x) != len(arrays[f"y_{split}"]):
            raise DataError(f"{path}: x_{split} must be (N, channels, length) with one label per window, got {x.shape}")
    if len(arrays["subject_train"]) != len(x_train):
        raise DataError(f"{path}: subject_train must hold one subject id per training window")
    mean = x_train.mean(axis=(0, 2), keepdims=True)
    std = x_train.std(axis=(0, 2), keepdims=True) + 1e-8
    classes = tuple(str(c) for c in arrays["classes"].tolist())
    return DatasetSplits(
        name="har",
        train=TensorDataset(torch.from_numpy(((x_train - mean) / std).astype(np.float32)), _as_long(arrays["y_train"])),
        test=TensorDataset(torch.from_numpy(((x_test - mean) / std).astype(np.float32)), _as_long(arrays["y_test"])),
        num_classes=len(classes) or 6,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        task="classification",
        labels=classes or None,
        train_groups=_as_long(arrays["subject_train"]),
    )


_PTB_SPLITS = ("test", "valid")


def _read_ptb_words(path: Path) -> list[str]:
    words: list[str] = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                words.extend(line.split())
                words.append("<eos>")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    return words


def _ptb_sequences(ids: list[int], seq_len: int, path: Path) -> TensorDataset:
    stream = torch.tensor(ids, dtype=torch.int64)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"{path} holds {len(stream)} tokens, too few for one sequence of seq_len={seq_len}; "
            "use a smaller seq_len"
        )
    inputs = stream[: n * seq_len].reshape(n, seq_len).clone()
    targets = stream[1 : n * seq_len + 1].reshape(n, seq_len).clone()
    return TensorDataset(inputs, targets)


@register_dataset("ptb")
def _load_ptb(
    root: Path, download: bool, *, seq_len: int = 35, test_split: str = "test"
) -> DatasetSplits:
    """Penn Treebank (Mikolov's word-level LM version).

    Files: ``<root>/PTB/ptb.{train,valid,test}.txt``, or ``<root>/ptb.*.txt`` directly.

    Preprocessing (as in pytorch/examples ``word_language_model``): each line is split on
    whitespace and ``<eos>`` is appended at its end. The vocabulary is built from the train file
    only; word ids are assigned in order of **first appearance** in ``ptb.train.txt`` (deterministic;
    ``<unk>`` is appended if the train file lacks it). On the canonical files this gives a
    10,000-word vocabulary and 929,589 train tokens. Words of the valid/test files missing from
    the vocabulary map to ``<unk>``.

    Each token stream of ``T`` tokens becomes ``(T - 1) // seq_len`` non-overlapping sequences:
    ``inputs[i] = stream[i*L:(i+1)*L]`` and ``targets[i] = stream[i*L+1:(i+1)*L+1]`` (the trailing
    tokens that do not fill a sequence are dropped). 929,589 train tokens -> 26,559 sequences at
    ``seq_len=35``.

    Options:
        seq_len: Sequence length (>= 1), default 35.
        test_split: ``"test"`` (default, ``ptb.test.txt``) or ``"valid"`` (``ptb.valid.txt``).
    """
    seq_len = _check_int_option("ptb", "seq_len", seq_len, 1)
    if test_split not in _PTB_SPLITS:
        raise DataError(
            f"option 'test_split' of dataset 'ptb' must be one of {list(_PTB_SPLITS)}, "
            f"got {test_split!r}"
        )
    names = ("ptb.train.txt", f"ptb.{test_split}.txt")
    folder = next(
        (c for c in (root / "PTB", root) if all((c / n).is_file() for n in names)), None
    )
    if folder is None:
        expected = "\n  ".join(str(root / "PTB" / n) for n in names)
        raise DataError(
            f"dataset 'ptb' not found: expected the files\n  {expected}\n(or the same files "
            f"directly in {root}). PTB cannot be downloaded automatically: place Mikolov's "
            f"ptb.train.txt / ptb.valid.txt / ptb.test.txt there, pass {_ROOT_HINT}, or set "
            f"${DATA_ROOT_ENV}."
        )
    if download:
        log.warning("ptb cannot be downloaded; download=True is ignored")

    train_words = _read_ptb_words(folder / names[0])
    vocab: dict[str, int] = {}
    for word in train_words:
        if word not in vocab:
            vocab[word] = len(vocab)
    if "<unk>" not in vocab:
        vocab["<unk>"] = len(vocab)
    unk = vocab["<unk>"]
    train_ids = [vocab[w] for w in train_words]
    test_ids = [vocab.get(w, unk) for w in _read_ptb_words(folder / names[1])]
    return DatasetSplits(
        name="ptb",
        train=_ptb_sequences(train_ids, seq_len, folder / names[0]),
        test=_ptb_sequences(test_ids, seq_len, folder / names[1]),
        num_classes=len(vocab),
        input_shape=(seq_len,),
        task="language_model",
        labels=tuple(vocab),
    )
