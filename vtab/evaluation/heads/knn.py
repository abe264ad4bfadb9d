"""``knn``: the k nearest training examples by cosine similarity vote for their classes (DINOv2's
``knn.py``): each neighbour's vote weighs exp(similarity / temperature), or 1 with uniform
votes. One predictor per k; scores are the votes, normalised to sum to 1 per example."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vtab.evaluation.heads.base import FitSettings, Fitted, HeadInput, multi_hot, register_head

CHUNK = 1024  # evaluation rows at once: bounds the [rows, training examples] similarities


def fit_one(config, data: HeadInput, device: str) -> dict[str, Fitted]:
    if max(config.k) > len(data.x):
        raise ValueError(f"head.k: {max(config.k)} neighbours asked, but the training split "
                         f"has {len(data.x)} examples")
    dev = torch.device(device)
    bank = F.normalize(data.x.to(dev).float(), dim=1)
    labels = multi_hot(data.targets, data.num_classes).float().to(dev)  # [N, C]
    largest = max(config.k)

    def votes(features: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat([votes_of_chunk(features[start:start + CHUNK], k)
                          for start in range(0, len(features), CHUNK)])

    def votes_of_chunk(features: torch.Tensor, k: int) -> torch.Tensor:
        similarity = F.normalize(features.to(dev).float(), dim=1) @ bank.T
        # topk is sorted, so the first k of the largest are the k nearest.
        nearest = similarity.topk(largest, dim=1)
        sims, index = nearest.values[:, :k], nearest.indices[:, :k]
        # exp((s - s_max) / T): the same normalised votes as exp(s / T), without overflow
        # for a small T (1/T > 88 overflows float32).
        weights = (torch.ones_like(sims) if config.votes == "uniform"
                   else ((sims - sims[:, :1]) / config.temperature).exp())
        counts = (weights[:, :, None] * labels[index]).sum(1)
        return counts / weights.sum(1, keepdim=True)

    return {f"k={k}": Fitted(lambda x, k=k: votes(x, k), "probabilities",
                             setting={"head.k": [k]}) for k in config.k}


@register_head("knn")
def fit(config, inputs: Sequence[HeadInput], settings: FitSettings) -> list[dict[str, Fitted]]:
    return [fit_one(config, data, settings.device) for data in inputs]
