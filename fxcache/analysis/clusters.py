"""ClusCa's view of a graph: per token stream, the token-wise units it refreshes and the residual-stream value it
clusters at FULL steps."""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from ..errors import UnsupportedGraphError
from .units import MLP, Unit


@dataclasses.dataclass
class ClusterGroup:
    """ClusCa: the units refreshed in one token stream, and the residual-stream value clustered at FULL steps."""

    tokens: int
    units: list[Unit]
    feature: fx.Node  # (B, tokens, D), output of the last block holding one of `units`
    clusters: int
    propagate: bool  # gamma propagation (the largest stream only)

    @property
    def labels_shape(self) -> tuple[int, int]:
        """Each token's cluster, per batch row: (B, tokens) int64."""
        return self.feature.meta["example_value"].shape[0], self.tokens

    @property
    def centroids_shape(self) -> tuple[int, int, int]:
        """(B, clusters, D) float32."""
        b, _, d = self.feature.meta["example_value"].shape
        return b, self.clusters, d


def cluster_groups(plan, clusters: int) -> dict[int, ClusterGroup]:
    """Refreshed units: token-wise feed-forward units that run on a subset, in blocks of the first block list."""
    first_list = plan.blocks[0].name.rsplit(".", 1)[0]
    groups: dict[int, ClusterGroup] = {}
    for block in plan.blocks:
        if block.name.rsplit(".", 1)[0] != first_list:
            continue
        for unit in block.units:
            if unit.kind != MLP or not unit.partial:
                continue
            feature = next((o for o in block.outputs if _is_stream(o, plan.batch, unit.tokens)), None)
            if feature is None:
                raise UnsupportedGraphError(
                    f"ClusCa: block {block.name} has no (batch, {unit.tokens}, dim) output to cluster for {unit.name}",
                    block=block.name)
            g = groups.setdefault(unit.tokens, ClusterGroup(unit.tokens, [], feature, clusters, False))
            g.units.append(unit)
            g.feature = feature  # the last block wins
    if not groups:
        raise UnsupportedGraphError("ClusCa: no token-wise feed-forward unit can be recomputed on a token subset")
    for g in groups.values():
        g.clusters = min(g.clusters, g.tokens)  # a short stream (a few text tokens): every token its own cluster
    groups[max(groups)].propagate = True
    return groups


def _is_stream(node: fx.Node, batch: int, tokens: int) -> bool:
    v = node.meta.get("example_value")
    return isinstance(v, torch.Tensor) and v.dim() == 3 and v.shape[0] == batch and v.shape[1] == tokens
