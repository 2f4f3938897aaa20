"""The stage computation of SWARM peers, without the network: micro-batches wired through two peers
per stage, gradient parts summed per stage, tied embeddings exchanged, clipped by the global norm
and applied, give pretrain_gpt.py's step (a PP=1 model in one process) on the same samples; the
stages' checkpoint parts assemble into a checkpoint pretrain_gpt.py loads, and a stage loads one of
pretrain_gpt.py's."""

import torch

from megatronish.model import GPTModel
from megatronish.optimizer import DistributedDataParallel
from megatronish.parallel_layout import ParallelLayout
from megatronish.swarm.arguments import parse_swarm_args
from megatronish.swarm.checkpoint import save_stage_part
from megatronish.swarm.stage import StageWorker
from megatronish.testing import run_distributed
from megatronish.training.arguments import transformer_config_from_args
from megatronish.training.checkpointing import load_checkpoint, save_checkpoint
from megatronish.training.progress import TrainingProgress
from megatronish.training.training import build_optimizer, train_step

VOCAB = 97


def _args(*extra):
    return parse_swarm_args("peer", ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                                     "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8",
                                     "--pp", "2", "--train-iters", "10", "--lr", "0.01", "--lr-warmup-iters", "1",
                                     *extra])


def _batches(generator, count, args):
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length), generator=generator)
        labels = torch.randint(0, VOCAB, tokens.shape, generator=generator)
        loss_mask = (torch.rand(tokens.shape, generator=generator) > 0.2).float()
        batches.append({"tokens": tokens, "labels": labels, "loss_mask": loss_mask})
    return batches


def _swarm_step(peers, step, batches, seed):
    """Wire each micro-batch through the peers of each stage, then commit the step on all four peers."""
    first, last = peers[0], peers[1]
    losses = []
    for index, batch in enumerate(batches):
        micro_batch = step * len(batches) + index
        a, b = first[index % 2], last[(index + 1) % 2]  # different wiring per stage
        samples = batch["tokens"].size(0)
        hidden = a.forward(batch["tokens"], seed, micro_batch)
        loss, grad = b.forward_backward(step, micro_batch, samples, hidden, batch["labels"], batch["loss_mask"],
                                        len(batches), seed)
        # micro-batches 0 and 3: backward where the forward ran (its graph kept); 1 and 2: rerouted (recomputed)
        first[(index // 2) % 2].backward(step, micro_batch, samples, batch["tokens"], grad, seed)
        losses.append(loss)
    assert [peer.recomputed for peer in first] == [step + 1] * 2  # once per step each: the rerouted one
    for stage in (first, last):
        parts = [peer.step_gradients[step].flat for peer in stage]
        for peer in stage:
            peer.sum_parts(step, 0, parts)
    for a, b in zip(first, last):
        a_part, b_part = a.embedding_part(step, 0), b.embedding_part(step, 0)
        a.set_embedding_gradient(step, 0, a_part + b_part)
        b.set_embedding_gradient(step, 0, b_part + a_part)
    norms = [stage[0].squared_norm(step, 0) for stage in (first, last)]
    assert [stage[1].squared_norm(step, 0) for stage in (first, last)] == norms  # the same bits on every peer
    norm = sum(norms) ** 0.5
    for stage in (first, last):
        for peer in stage:
            assert peer.apply(step, 0, norm)
    return sum(losses) / len(losses), norm


def _checkpoints(args, config, peers, reference, optimizer, scheduler, folder):
    """SWARM parts -> one checkpoint that pretrain_gpt.py's loader reads; pretrain's checkpoint -> a stage."""
    for stage, group in enumerate(peers):
        published = save_stage_part(str(folder / "swarm"), stage, 2, *group[0].checkpoint_part(args))
        assert (published is not None) == (stage == 1)  # the second part completes the set
    model = GPTModel(config, seed=args.seed + 1, layout=reference.layout)  # other initial weights
    fresh_optimizer, fresh_scheduler = build_optimizer(args, DistributedDataParallel(model, layout=model.layout))
    assert load_checkpoint(str(folder / "swarm"), [model], fresh_optimizer, fresh_scheduler).iteration == 2
    saved = {**peers[0][0].optimizer.sharded_state_by_name()["params"],
             **peers[1][0].optimizer.sharded_state_by_name()["params"]}
    for name, state in fresh_optimizer.sharded_state_by_name()["params"].items():
        for key, value in state.items():
            assert torch.equal(value, saved[name][key]), (name, key)
    assert fresh_scheduler.state_dict() == peers[0][0].scheduler.state_dict()

    save_checkpoint(str(folder / "pretrain"), TrainingProgress(iteration=2), [reference], optimizer, scheduler, args)
    stage = StageWorker(args, config, 1, 2)
    assert stage.load_checkpoint(str(folder / "pretrain")) and stage.iteration == 2
    expected = dict(reference.named_parameters())
    for name, param in stage.model.named_parameters():
        assert torch.equal(param, expected[name]), name


def _compare(clip, folder=None):
    args = _args("--clip-grad", str(clip))
    config = transformer_config_from_args(args, VOCAB)
    reference = GPTModel(config, seed=args.seed, layout=ParallelLayout.build(1, 1))
    ddp = DistributedDataParallel(reference, layout=reference.layout)
    optimizer, scheduler = build_optimizer(args, ddp)
    peers = [[StageWorker(args, config, stage, 2, keep_forwards=2) for _ in range(2)] for stage in range(2)]
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    rows = []
    for step in range(2):
        batches = _batches(generator, args.global_batch_size // args.micro_batch_size, args)
        loss, _, grad_norm = train_step(batches, ddp, optimizer)
        scheduler.step(args.global_batch_size)
        swarm_loss, swarm_norm = _swarm_step(peers, step, batches, seed=1000 + step)
        rows.append((loss, swarm_loss, grad_norm, swarm_norm))
        expected = dict(reference.named_parameters())
        for stage in peers:
            digests = {peer.digest() for peer in stage}
            assert len(digests) == 1, "peers of a stage differ"
            for name, param in stage[0].model.named_parameters():
                torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)
            assert stage[0].iteration == step + 1
            assert stage[0].optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    if folder is not None:
        _checkpoints(args, config, peers, reference, optimizer, scheduler, folder)
    return rows


def test_two_peers_per_stage_step_like_pretrain_gpt_and_checkpoints_go_both_ways(tmp_path):
    # clip 0.05: every step is clipped, so the norm must be the whole model's (both stages), not a stage's
    for clip, folder in ((0.05, tmp_path), (0.0, None)):
        rows = run_distributed(_compare, 1, args=(clip, folder))[0]
        for loss, swarm_loss, norm, swarm_norm in rows:
            assert abs(loss - swarm_loss) < 1e-5 * abs(loss)
            assert abs(norm - swarm_norm) < 1e-5 * norm
