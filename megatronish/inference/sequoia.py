"""Sequoia's token trees (arXiv 2402.12374): the best tree for measured acceptance rates, and the
best tree size for the machine.

Acceptance: acceptance[k-1] is the probability that the k-th candidate the draft proposes below
an accepted node is the one the target accepts (measured by `measure_acceptance`, assumed the
same at every node). The expected tokens per target forward of a tree are then the sum over its
nodes of the product of their ranks' acceptance along the path (TokenTree.expected_tokens).

The dynamic program: value(d, n) = the most expected tokens of a tree of n nodes and depth at most
d. The root counts 1 and its children, ranks 1, 2, ... (a prefix: the second candidate exists only
with the first), carry subtrees of depth at most d - 1 whose sizes add up to n - 1:

    value(0, 1) = 1,   value(d, n) = 1 + max over sizes m_1 + ... + m_j = n - 1 of
                                         sum_k acceptance[k-1] * value(d - 1, m_k)

solved for every n and d at once, child rank by child rank (a knapsack over the sizes).

Hardware awareness: a target forward of n tokens costs about as much as one of 1 token on a
GPU until n gets large, and more and more beyond; `plan_tree` takes the measured seconds of target
and draft forwards of 1..N tokens and picks the tree that maximizes expected tokens per second.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatronish.inference.context import InferenceContext, forward_step
from megatronish.inference.generation import generate
from megatronish.inference.tree import TokenTree


def tree_values(acceptance, max_size: int, max_depth: int):
    """The DP tables: value [max_depth + 1, max_size + 1] (-inf where no tree exists) and, for each
    depth bound d >= 1 and size n, the sizes of the root's subtrees in rank order."""
    ranks = len(acceptance)
    value = np.full((max_depth + 1, max_size + 1), -np.inf)
    value[:, 1] = 1.0
    subtree_sizes = {(d, 1): () for d in range(max_depth + 1)}
    for d in range(1, max_depth + 1):
        below = value[d - 1]
        # best[k][r]: the most that children of ranks k+1.. add with exactly r nodes between them.
        best = np.full((ranks + 1, max_size), -np.inf)
        best[:, 0] = 0.0
        first = np.zeros((ranks + 1, max_size), dtype=int)  # the size chosen for the rank-(k+1) child
        for k in range(ranks - 1, -1, -1):
            for r in range(1, max_size):
                sizes = np.arange(1, r + 1)
                fits = np.isfinite(below[sizes])  # -inf where no subtree of that size fits (0 * -inf is nan)
                weighted = np.where(fits, acceptance[k] * np.where(fits, below[sizes], 0.0), -np.inf)
                options = weighted + best[k + 1][r - sizes]
                choice = int(np.argmax(options))
                best[k][r], first[k][r] = options[choice], sizes[choice]
        for n in range(2, max_size + 1):
            value[d, n] = 1.0 + best[0][n - 1]
            if np.isfinite(value[d, n]):
                sizes, k, left = [], 0, n - 1
                while left:
                    sizes.append(int(first[k][left]))
                    left -= first[k][left]
                    k += 1
                subtree_sizes[d, n] = tuple(sizes)
    return value, subtree_sizes


def best_tree(acceptance, size: int, max_depth: int) -> TokenTree:
    """The tree of `size` nodes and depth at most max_depth with the most expected tokens."""
    if size < 1 or max_depth < 0 or (size > 1 and max_depth == 0):
        raise ValueError(f"no tree has {size} nodes and depth at most {max_depth}: need size >= 1, and "
                         "max_depth >= 1 for more than the root")
    _, subtree_sizes = tree_values(acceptance, size, max_depth)
    if (max_depth, size) not in subtree_sizes:
        raise ValueError(f"no tree of {size} nodes fits depth {max_depth} with {len(acceptance)} candidates "
                         f"per node: lower the size or raise the depth or the number of acceptance rates")
    return _build(subtree_sizes, size, max_depth)


def _build(subtree_sizes, size: int, depth: int) -> TokenTree:
    parents, queue = [-1], [(0, size, depth)]  # breadth first: level order, siblings in rank order
    while queue:
        node, n, d = queue.pop(0)
        for m in subtree_sizes[d, n]:
            queue.append((len(parents), m, d - 1))
            parents.append(node)
    return TokenTree(tuple(parents))


@dataclass(frozen=True)
class TreePlan:
    tree: TokenTree
    expected_tokens: float  # per target forward
    seconds_per_step: float  # predicted: the draft's forwards plus the target's

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.seconds_per_step


def step_seconds(tree: TokenTree, target_seconds, draft_seconds) -> float:
    """Predicted time of one step: the draft forwards each level whose nodes have children (the
    root's level with the one or two tokens the draft has not seen), the target all nodes at once."""
    widths = [sum(1 for node in level if tree.children[node]) for level in tree.levels()]
    draft = sum(draft_seconds[max(width, 1) - 1] for width in widths if width)
    return target_seconds[tree.size - 1] + draft


def plan_tree(acceptance, target_seconds, draft_seconds, max_depth: int) -> TreePlan:
    """Sequoia's hardware-aware choice: over sizes 1..len(target_seconds) and depths up to max_depth,
    the DP-best tree that maximizes expected tokens per second. target_seconds[n-1] and
    draft_seconds[n-1] are the measured times of a forward of n tokens."""
    max_size = len(target_seconds)
    if len(draft_seconds) < max_size:
        raise ValueError(f"need draft forward times for 1..{max_size} tokens, got {len(draft_seconds)}")
    value, subtree_sizes = tree_values(acceptance, max_size, max_depth)
    plans = []
    for d in range(0, max_depth + 1):
        for n in range(1, max_size + 1):
            if np.isfinite(value[d, n]) and (d, n) in subtree_sizes:
                tree = _build(subtree_sizes, n, d)
                plans.append(TreePlan(tree, float(value[d, n]), step_seconds(tree, target_seconds, draft_seconds)))
    return max(plans, key=lambda plan: plan.tokens_per_second)


@torch.no_grad()
def measure_forward_seconds(model, max_tokens: int, context_length: int = 64, repeats: int = 3) -> list[float]:
    """Median seconds of a KV-cached forward of 1..max_tokens tokens after context_length cached ones."""
    device = next(model.parameters()).device
    context = InferenceContext(1, context_length + max_tokens, device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, context_length + max_tokens), generator=generator).to(device)
    forward_step(model, context, tokens[:, :context_length])
    context.commit(context_length)
    seconds = []
    for n in range(1, max_tokens + 1):
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward_step(model, context, tokens[:, context_length:context_length + n])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            context.commit(0)
        seconds.append(sorted(times)[len(times) // 2])
    return seconds


def measure_acceptance(target, draft, requests, width: int = 8) -> list[float]:
    """The acceptance vector of `width` ranks, measured by decoding the requests with a tree of one
    level of `width` candidates (use the sampling settings of the run: greedy accepts differently)."""
    stats = generate(target, requests, draft=draft, tree=TokenTree((-1,) + (0,) * width)).stats
    rates = stats.acceptance_by_rank()
    return rates + [0.0] * (width - len(rates))


def plan_for_machine(target, draft, acceptance, max_size: int, max_depth: int) -> TreePlan:
    """plan_tree with the target's and the draft's forward times measured here for 1..max_size tokens.
    Every TP rank measures (the forwards are collectives) and all take TP rank 0's plan."""
    plan = plan_tree(acceptance, measure_forward_seconds(target, max_size), measure_forward_seconds(draft, max_size),
                     max_depth)
    if target.tp_group.size() > 1:
        shared = [plan]
        dist.broadcast_object_list(shared, dist.get_global_rank(target.tp_group, 0), group=target.tp_group)
        plan = shared[0]
    return plan
