"""Datasets, federated partitions and client data loaders."""

from lightning_fedprune.data.datasets import (
    DATA_ROOT_ENV,
    DatasetSplits,
    available_datasets,
    clear_dataset_cache,
    dataset_description,
    default_data_root,
    load_dataset,
    register_dataset,
)
from lightning_fedprune.data.federated import FederatedDataset
from lightning_fedprune.data.loaders import StepsLoader, client_batches, steps_loader
from lightning_fedprune.data.partition import (
    PARTITION_SCHEMES,
    ClientSplit,
    Partition,
    make_partition,
    partition_dirichlet,
    partition_dominant_label,
    partition_iid,
    partition_missing_classes,
    partition_options,
    partition_shards,
)

__all__ = [
    "steps_loader",
    "FederatedDataset",
    "DATA_ROOT_ENV",
    "PARTITION_SCHEMES",
    "ClientSplit",
    "DatasetSplits",
    "Partition",
    "StepsLoader",
    "available_datasets",
    "clear_dataset_cache",
    "dataset_description",
    "partition_options",
    "client_batches",
    "default_data_root",
    "load_dataset",
    "make_partition",
    "partition_dirichlet",
    "partition_dominant_label",
    "partition_iid",
    "partition_missing_classes",
    "partition_shards",
    "register_dataset",
]
