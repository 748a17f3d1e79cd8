"""A linear classification head fitted on frozen features (the `last` embeddings): what train-head trains.

Single-label: multinomial logistic regression; multi-label: one sigmoid per label. Both with an L2 penalty
and no bias (Persimmon's `score` head has none), fitted by L-BFGS on features scaled per dimension
(by their root mean square, no centring: a centring would need a bias); the scale is folded back into the
weights, so the head applies to the raw hidden states. The penalty is chosen on a validation part of the
training rows when there are enough of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_PENALTY = 1e-2


@dataclass
class Head:
    weight: torch.Tensor  # (labels, hidden) float32, for raw features
    penalty: float


def split(groups: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices: `fraction` of each group's rows held out at random (stratified, so
    every label keeps rows on both sides when it can), at least one row of each group kept."""
    gen = torch.Generator().manual_seed(seed)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    kept, held = [], []
    for g in sorted(members):
        rows = members[g]
        order = [rows[j] for j in torch.randperm(len(rows), generator=gen).tolist()]
        n = min(int(round(fraction * len(rows))), len(rows) - 1)
        held += order[:n]
        kept += order[n:]
    return sorted(kept), sorted(held)


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return torch.nn.functional.cross_entropy(logits, y)


def _fit(x: torch.Tensor, y: torch.Tensor, labels: int, penalty: float, multi_label: bool) -> torch.Tensor:
    w = torch.zeros(labels, x.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _loss(x @ w.T, y, multi_label) + 0.5 * penalty * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(weight: torch.Tensor, x: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Class ids (N,) or a 0/1 matrix (N, labels) for raw features."""
    logits = x.to(weight.dtype) @ weight.T
    return (logits > 0).long() if multi_label else logits.argmax(-1)


def fit_head(features: torch.Tensor, targets: torch.Tensor, labels: int, multi_label: bool = False,
             penalty: float | None = None, seed: int = 0) -> Head:
    """features (N, hidden); targets: class ids (N,) or a 0/1 matrix (N, labels) for multi-label."""
    # float64 while the features take under 2 GB that way (a few hundred thousand rows of an 8B model's
    # 4096 dimensions), float32 past that
    x = features.double() if features.numel() * 8 < 2**31 else features.float()
    scale = x.pow(2).mean(0).sqrt().clamp_min(1e-12)
    x = x / scale
    y = targets.to(x.dtype) if multi_label else targets.long()
    if penalty is None:
        penalty = DEFAULT_PENALTY
        groups = [0] * len(x) if multi_label else y.tolist()
        fit_rows, val_rows = split(groups, 0.2, seed + 1)
        if len(val_rows) >= 10:  # enough rows to choose the penalty on
            score = []
            for p in PENALTIES:
                w = _fit(x[fit_rows], y[fit_rows], labels, p, multi_label)
                right = (predict(w, x[val_rows], multi_label) == y[val_rows].long())
                score.append(right.all(-1).double().mean().item() if multi_label else right.double().mean().item())
            best = max(score)
            penalty = max(p for p, s in zip(PENALTIES, score) if s == best)  # the strongest among the best
    w = _fit(x, y, labels, penalty, multi_label)
    return Head((w / scale).float(), penalty)


def metrics(predicted: torch.Tensor, truth: torch.Tensor, multi_label: bool, labels: int) -> dict[str, float]:
    """Accuracy (exact match for multi-label) and macro-F1 over the labels seen in truth or predictions."""
    if multi_label:
        accuracy = (predicted == truth).all(-1).double().mean().item()
        pred_sets, true_sets = predicted.bool(), truth.bool()
    else:
        accuracy = (predicted == truth).double().mean().item()
        pred_sets = torch.nn.functional.one_hot(predicted, labels).bool()
        true_sets = torch.nn.functional.one_hot(truth, labels).bool()
    f1 = []
    for k in range(labels):
        tp = (pred_sets[:, k] & true_sets[:, k]).sum().item()
        fp = (pred_sets[:, k] & ~true_sets[:, k]).sum().item()
        fn = (~pred_sets[:, k] & true_sets[:, k]).sum().item()
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1) / len(f1) if f1 else 0.0}


def majority(targets: torch.Tensor, multi_label: bool, labels: int) -> torch.Tensor:
    """The majority-class prediction learned from these targets: one class id, or each label's usual value."""
    if multi_label:
        return (targets.double().mean(0) > 0.5).long()
    return torch.bincount(targets, minlength=labels).argmax()
