"""HAR sensor windows (the real data in ../shared/data), the 1-D CNN and the partition by subject."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_fedprune.data import load_dataset, make_partition
from lightning_fedprune.data.partition import partition_by_group
from lightning_fedprune.errors import DataError
from lightning_fedprune.models import create_model


@pytest.fixture(scope="module")
def har():
    try:
        return load_dataset("har")
    except DataError as err:
        pytest.skip(f"HAR data not available: {err}")


def test_har_windows_labels_and_subjects(har):
    x, y = har.train.tensors
    assert x.shape[1:] == (9, 128) and har.input_shape == (9, 128) and har.num_classes == 6
    assert int(y.min()) == 0 and int(y.max()) == 5
    assert len(har.train_groups) == len(x) and len(torch.unique(har.train_groups)) == 21  # UCI HAR's train subjects
    # standardized per channel on the training windows
    assert torch.allclose(x.mean(dim=(0, 2)), torch.zeros(9), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2)), torch.ones(9), atol=1e-3)


def test_partition_by_subject_gives_each_client_whole_subjects(har):
    part = make_partition("by_group", har.train_targets, 5, seed=0, groups=har.train_groups)
    g = har.train_groups.numpy()
    owners = {}
    for k, split in enumerate(part.clients):
        for s in np.unique(g[split.train]):
            assert s not in owners  # no subject is shared
            owners[s] = k
    assert sorted(owners) == sorted(np.unique(g)) and sum(len(c.train) for c in part.clients) == len(g)
    assert sorted(s for s, k in owners.items() if k == 0) == list(np.unique(g)[0::5])  # dealt round-robin


def test_a_1d_cnn_trains_on_har_windows(har):
    model = create_model("cnn_har")
    x, y = har.train.tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    losses = []
    for i in range(30):
        idx = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it learns


def test_by_group_refusals():
    with pytest.raises(DataError, match="needs the dataset's group ids"):
        partition_by_group(None, 2)
    with pytest.raises(DataError, match="3 clients but only 2 groups"):
        partition_by_group([1, 1, 2, 2], 3)
    assert [p.tolist() for p in partition_by_group([5, 3, 5, 9, 3], 2)] == [[1, 3, 4], [0, 2]]  # groups 3, 9 | 5
