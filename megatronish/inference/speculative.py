"""Speculative decoding of one request: a draft model proposes a token tree, the target verifies
all of it in one forward, the accepted path is kept.

One step, for any TokenTree (a chain of k draft tokens is the tree -1, 0, 1, ..., k-1):
1. The draft runs the tokens it has not seen yet (the last one or two; the whole prompt at first),
   the last of which is the tree's root, then level by level the nodes that have children, each
   attending to its ancestors; below each node it draws that node's children: the most likely
   tokens (greedy) or draws without replacement from its distribution q.
2. The target runs every node at once under the tree's ancestor mask (positions = depth after
   the root's) and gives each node's distribution p.
3. Verification walks down from the root. Greedy: the child whose token is the target's argmax is
   accepted; none is, the argmax is the next token. Sampling (Sequoia's rule for children drawn
   without replacement, which is speculative sampling's for a chain): child x is accepted with
   probability min(1, p(x) / q(x)); after a rejection p becomes norm(max(p - q, 0)) and x leaves q
   (q renormalized); when no child is accepted the next token is drawn from what p has become.
   Either way the tokens come out distributed as the target's own sampling would give them.
4. Both caches keep the accepted path (rejected branches are dropped); the target's extra token
   becomes the next root.
"""

import torch

from megatronish.inference.context import InferenceContext, agree_across_tp, forward_step
from megatronish.inference.request import CompletionTracker, GenerationStats
from megatronish.inference.sampling import SamplingParams, candidates, probabilities
from megatronish.inference.tree import TokenTree


@torch.no_grad()
def speculative_decode(target, draft, tracker: CompletionTracker, tree: TokenTree, stats: GenerationStats,
                       device: torch.device) -> None:
    request = tracker.request
    capacity = len(request.prompt) + request.max_new_tokens + tree.size
    target_context, draft_context = InferenceContext(1, capacity, device), InferenceContext(1, capacity, device)
    generator = torch.Generator(device=device).manual_seed(request.seed)
    max_positions = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    tokens = list(request.prompt)
    cut_trees = {tree.size: tree}  # the tree cut to the positions left near the end, by node count
    if len(tokens) > 1:  # the target's cache holds every token but the last, the next step's root
        forward_step(target, target_context, torch.tensor([tokens[:-1]], device=device),
                     logits_at=torch.zeros(1, dtype=torch.long, device=device))  # only the cache is wanted
        target_context.commit(len(tokens) - 1)
    while not tracker.finished:
        # Near the last position, only the levels that still have a position take part (a prefix of the nodes).
        room = max_positions - len(tokens)
        count = sum(1 for depth in tree.depths if depth <= room)
        if count not in cut_trees:
            cut_trees[count] = TokenTree(tree.parents[:count])
        step_tree = cut_trees[count]
        node_tokens, draft_probs, draft_offsets, seen = _draft(draft, draft_context, tokens, step_tree,
                                                               request.sampling, generator, stats, device,
                                                               target.tp_group)
        positions = len(tokens) - 1 + torch.tensor(step_tree.depths, device=device)[None]
        target_logits = forward_step(target, target_context, node_tokens[None], positions,
                                     step_tree.ancestor_mask().to(device))[0]
        stats.target_forwards += 1
        path, next_token = _verify(step_tree, node_tokens.tolist(), target_logits, draft_probs, request.sampling,
                                   generator, stats)
        path, next_token = _agree(path, next_token, tree.depth, device, target.tp_group)
        new_tokens = node_tokens[path[1:]].tolist() + [next_token]
        stats.generated_tokens += len(new_tokens)
        tracker.extend(new_tokens)
        target_context.keep([path])
        kept = [draft_offsets[node] for node in path[1:] if node in draft_offsets]
        draft_context.keep([list(range(seen)) + kept])
        tokens += new_tokens


def _draft(draft, context: InferenceContext, tokens: list[int], tree: TokenTree, sampling: SamplingParams,
           generator, stats: GenerationStats, device, tp_group):
    """Fill the tree with draft tokens -> (node tokens [size], {node: q or None (greedy)}, {node: pending
    offset in the draft's cache}, how many of the sequence's tokens the draft had not seen before)."""
    unseen = tokens[context.lengths[0]:]
    node_tokens = torch.empty(tree.size, dtype=torch.long, device=device)
    node_tokens[0] = tokens[-1]
    if not tree.children[0]:  # nothing to draft (the tree is the root alone): the draft catches up later
        return node_tokens, {}, {}, 0
    logits = {0: forward_step(draft, context, torch.tensor([unseen], device=device),
                              logits_at=torch.tensor([len(unseen) - 1], device=device))[0, 0]}
    stats.draft_forwards += 1
    offsets = {0: len(unseen) - 1}
    probs = {}
    for level in tree.levels():
        growing = [node for node in level if tree.children[node]]
        if not growing:
            break
        for node in growing:
            probs[node] = None if sampling.greedy else probabilities(logits[node], sampling)
            children = list(tree.children[node])
            node_tokens[children] = candidates(logits[node], probs[node], len(children), generator)
        agree_across_tp(node_tokens, tp_group)
        expanding = [child for node in growing for child in tree.children[node] if tree.children[child]]
        if not expanding:
            break
        mask = torch.zeros(len(expanding), context.pending + len(expanding), dtype=torch.bool)
        mask[:, :len(unseen)] = True  # the root and the tokens before it
        for i, node in enumerate(expanding):
            offsets[node] = context.pending + i
            mask[i, [offsets[a] for a in tree.path(node)[1:]]] = True
        positions = len(tokens) - 1 + torch.tensor([[tree.depths[node] for node in expanding]], device=device)
        level_logits = forward_step(draft, context, node_tokens[expanding][None], positions, mask.to(device))[0]
        stats.draft_forwards += 1
        logits.update(zip(expanding, level_logits))
    return node_tokens, probs, offsets, len(unseen)


def _verify(tree: TokenTree, node_tokens: list[int], target_logits: torch.Tensor, draft_probs: dict,
            sampling: SamplingParams, generator, stats: GenerationStats) -> tuple[list[int], int]:
    """-> (the accepted path of nodes from the root, the target's next token after it)."""
    path = [0]
    while True:
        node = path[-1]
        children = tree.children[node]
        for rank in range(len(children)):
            stats.count(stats.rank_tried, rank)
        if children:
            stats.count(stats.depth_tried, len(path) - 1)
        if sampling.greedy:
            best = int(target_logits[node].argmax())
            accepted = next((child for child in children if node_tokens[child] == best), None)
            residual = None
        else:
            accepted, residual = _accept_sampled(children, node_tokens, probabilities(target_logits[node], sampling),
                                                 draft_probs.get(node), generator)
        if accepted is None:
            next_token = best if sampling.greedy else int(torch.multinomial(residual, 1, generator=generator))
            return path, next_token
        stats.count(stats.rank_accepted, tree.rank(accepted))
        stats.count(stats.depth_reached, len(path) - 1)
        path.append(accepted)


def _accept_sampled(children, node_tokens, p: torch.Tensor, q: torch.Tensor | None, generator):
    """The accepted child of a node (or None) and the distribution left to draw from if none is."""
    if not children:
        return None, p
    q = q.clone()
    for child in children:
        token = node_tokens[child]
        if q[token] == 0:  # an impossible filler: the draft had fewer possible tokens than children
            continue
        if torch.rand((), generator=generator, device=p.device) * q[token] < p[token]:
            return child, None
        residual = (p - q).clamp_(min=0)
        if residual.sum() > 0:  # p == q up to rounding would leave nothing: keep p then
            p = residual / residual.sum()
        q[token] = 0
        if q.sum() > 0:
            q = q / q.sum()
    return None, p


def _agree(path: list[int], next_token: int, max_depth: int, device, tp_group) -> tuple[list[int], int]:
    """TP rank 0's verification result on every TP rank."""
    packed = torch.full((max_depth + 2,), -1, dtype=torch.long)
    packed[0], packed[1:len(path) + 1] = next_token, torch.tensor(path)
    packed = agree_across_tp(packed.to(device), tp_group)
    return [n for n in packed[1:].tolist() if n >= 0], int(packed[0])
