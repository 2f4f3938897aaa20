"""The shape of a speculation tree: which draft token hangs below which.

Node 0 is the root: the last token already decided. Every other node is a draft token whose
parent is an earlier node; the children of a node are the draft's candidates for the token
after it, in the order the draft drew them (the first child is its first choice). Nodes are
numbered level by level and, within a level, by parent and then by rank among siblings, so
`parents[1:]` never decreases. A chain of k draft tokens is the tree (-1, 0, 1, ..., k-1).
"""

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class TokenTree:
    parents: tuple[int, ...]

    def __post_init__(self):
        parents = tuple(self.parents)
        object.__setattr__(self, "parents", parents)
        if not parents or parents[0] != -1:
            raise ValueError(f"a token tree starts with its root, parent -1; got parents {list(parents)}")
        for i in range(1, len(parents)):
            if not 0 <= parents[i] < i or parents[i] < parents[i - 1]:
                raise ValueError(f"node {i} has parent {parents[i]}: parents must be earlier nodes, numbered level "
                                 f"by level (parents[1:] non-decreasing); got {list(parents)}")

    @classmethod
    def chain(cls, length: int) -> "TokenTree":
        """`length` draft tokens one after another."""
        return cls((-1, *range(length)))

    @property
    def size(self) -> int:
        """Nodes, the root included: the number of tokens the target verifies in one forward."""
        return len(self.parents)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        out = [[] for _ in self.parents]
        for node, parent in enumerate(self.parents[1:], start=1):
            out[parent].append(node)
        return tuple(tuple(c) for c in out)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        depths = [0]
        for parent in self.parents[1:]:
            depths.append(depths[parent] + 1)
        return tuple(depths)

    @property
    def depth(self) -> int:
        return max(self.depths)

    def rank(self, node: int) -> int:
        """The node's place among its siblings (0 = the draft's first choice)."""
        return self.children[self.parents[node]].index(node)

    def path(self, node: int) -> list[int]:
        """The nodes from the root down to `node`."""
        out = []
        while node != -1:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def levels(self) -> list[list[int]]:
        """The nodes of each depth, in order."""
        out = [[] for _ in range(self.depth + 1)]
        for node, depth in enumerate(self.depths):
            out[depth].append(node)
        return out

    def ancestor_mask(self) -> torch.Tensor:
        """bool [size, size]: mask[i, j] says that node j is node i or one of its ancestors."""
        return self._ancestor_mask.clone()

    @cached_property
    def _ancestor_mask(self) -> torch.Tensor:  # built once per tree: decoding asks for it every step
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        for node in range(self.size):
            mask[node, self.path(node)] = True
        return mask

    def expected_tokens(self, acceptance) -> float:
        """Tokens a target forward yields on average (the accepted draft tokens plus the target's own)
        if the k-th candidate below any accepted node is the accepted one with probability
        acceptance[k-1] (Sequoia's positional acceptance): the sum over nodes of the product of the
        acceptance of their ranks along the path, the root counting 1."""
        value = [1.0]
        for node in range(1, self.size):
            rank = self.rank(node)
            weight = acceptance[rank] if rank < len(acceptance) else 0.0
            value.append(value[self.parents[node]] * weight)
        return sum(value)
