"""The linear head fit (pipelines/head.py) on synthetic features with a known answer."""

from __future__ import annotations

import torch

from pipelines import head


def blobs(n=600, dim=32, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, dim, generator=gen)
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, dim, generator=gen), y


def test_split_is_stratified_and_keeps_every_label():
    groups = [0] * 50 + [1] * 10 + [2] * 2
    kept, held = head.split(groups, 0.2, seed=0)
    assert sorted(kept + held) == list(range(62)) and not set(kept) & set(held)
    assert [sum(groups[i] == g for i in held) for g in range(3)] == [10, 2, 0]
    assert head.split(groups, 0.2, seed=0) == (kept, held) != head.split(groups, 0.2, seed=1)


def test_single_label_fit_separates_blobs_with_no_bias():
    x, y = blobs()
    x = x + 5.0  # far from the origin: the head has no bias to absorb an offset
    kept, held = head.split(y.tolist(), 0.25, seed=0)
    fitted = head.fit_head(x[kept], y[kept], 3)
    assert fitted.weight.shape == (3, 32) and fitted.weight.dtype == torch.float32
    got = head.metrics(head.predict(fitted.weight, x[held], False), y[held], False, 3)
    assert got["accuracy"] > 0.95 and got["macro_f1"] > 0.95
    baseline = head.majority(y[kept], False, 3).repeat(len(held))
    assert head.metrics(baseline, y[held], False, 3)["accuracy"] < 0.4


def test_multi_label_fit():
    x, y = blobs(classes=4)
    targets = torch.stack([(y == 0) | (y == 1), (y == 1) | (y == 2)], dim=1).long()  # two tags, overlapping
    kept, held = head.split([0] * len(y), 0.25, seed=0)
    fitted = head.fit_head(x[kept], targets[kept], 2, multi_label=True)
    got = head.metrics(head.predict(fitted.weight, x[held], True), targets[held], True, 2)
    assert got["accuracy"] > 0.9


def test_metrics_by_hand():
    truth, predicted = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])
    m = head.metrics(predicted, truth, False, 2)
    assert m["accuracy"] == 0.75
    assert abs(m["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-12  # label 0: P 1, R 1/2; label 1: P 2/3, R 1
