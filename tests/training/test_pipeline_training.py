"""Pipeline parallelism end to end through pretrain (CPU, gloo, fp32, dropout 0).

Per-iteration losses, grad norms and validation losses of 8 iterations at PP=2, PP=4, PP=2 x TP=2,
PP=2 x DP=2, PP=2 x TP=2 x DP=2 (8 ranks) and interleaved (PP=2, 2 virtual stages) equal PP=1
within 1e-5 relative, with tied and untied embeddings, sequence parallelism, the distributed
optimizer, overlapped gradient reduction and overlapped parameter gathers (landing only when waited
for: param_gather_testing). A checkpoint saved at PP=2 x TP=2 resumes at
PP=1 x TP=1 (training continues on the uninterrupted trajectory) and at PP=4 (validation loss
equal within 1e-6); one saved at PP=1 continues training at PP=4.
"""

import pytest
import torch
from checkpoint_testing import build_corpus
from param_gather_testing import slow_param_gathers

from megatronish import parallel_state
from megatronish.testing import run_distributed, run_pretrain
from megatronish.training.checkpointing import load_model_for_inference, read_full_model_state

ITERS = 8
REL = 1e-5  # fp32: only the order of additions differs between layouts


def _argv(corpus: str, *extra: str, iters: int = ITERS) -> list[str]:
    """4 layers (PP 4, or PP 2 x 2 virtual stages), global batch 8 = 4 micro-batches of 2 at DP 1."""
    return ["--data-path", corpus, "--data-cache-path", corpus + "-cache", "--tokenizer-type", "ByteTokenizer",
            "--split", "90,10,0", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
            "--clip-grad", "0.5", "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1000",
            "--eval-interval", "4", "--eval-iters", "1", "--num-workers", "0", *extra]


def _runs(argvs: list[list[str]]) -> list[dict]:
    with slow_param_gathers():  # changes only the runs with --overlap-param-gather
        return [run_pretrain(argv) for argv in argvs]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def references(corpus):
    """PP=1 runs: tied and untied embeddings."""
    tied, untied = run_distributed(_runs, 1, args=([_argv(corpus), _argv(corpus, "--untie-embeddings-and-output-weights")],),
                                   timeout=300)[0]
    assert tied["losses"][-1] < tied["losses"][0] - 0.2  # it trains
    return {"tied": tied, "untied": untied}


def _assert_same_run(result: dict, reference: dict, what: str) -> None:
    assert result["losses"] == pytest.approx(reference["losses"], rel=REL), what
    assert result["grad_norms"] == pytest.approx(reference["grad_norms"], rel=REL), what
    assert result["valid"].keys() == reference["valid"].keys(), what
    assert list(result["valid"].values()) == pytest.approx(list(reference["valid"].values()), rel=REL), what
    assert result["final_valid"] == pytest.approx(reference["final_valid"], rel=REL), what


LAYOUTS = {  # world size -> [(what, embeddings, extra flags)]
    2: [("PP=2", "tied", ["--pp", "2"]),
        ("PP=2 untied", "untied", ["--pp", "2", "--untie-embeddings-and-output-weights"]),
        ("PP=2 x 2 virtual stages", "tied", ["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
        ("PP=2, full recompute", "tied", ["--pp", "2", "--recompute-granularity", "full"]),
        ("PP=2 x 2 virtual stages, selective recompute", "untied",
         ["--pp", "2", "--virtual-pipeline-model-parallel-size", "2", "--recompute-granularity", "selective",
          "--untie-embeddings-and-output-weights"])],
    4: [("PP=4 untied", "untied", ["--pp", "4", "--untie-embeddings-and-output-weights"]),
        ("PP=2 x TP=2, sequence parallel", "tied", ["--pp", "2", "--tp", "2", "--sequence-parallel"]),
        ("PP=2 x DP=2, distributed optimizer, overlap", "untied",
         ["--pp", "2", "--use-distributed-optimizer", "--overlap-grad-reduce", "--untie-embeddings-and-output-weights"]),
        ("PP=2 uneven (1 + 3 layers) x DP=2", "tied",
         ["--pp", "2", "--decoder-first-pipeline-num-layers", "1"]),
        # the last stage's output layer reads the tied embedding copy, a parameter of a module it does not call
        ("PP=2 x 2 virtual stages x DP=2, distributed optimizer, overlapped parameter gather", "tied",
         ["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--use-distributed-optimizer",
          "--overlap-param-gather"])],
    8: [("PP=2 x TP=2 x DP=2, sequence parallel, distributed optimizer, overlap", "tied",
         ["--pp", "2", "--tp", "2", "--sequence-parallel", "--use-distributed-optimizer", "--overlap-grad-reduce"])],
}


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_pipeline_layouts_match_pp1(corpus, references, world_size):
    cases = LAYOUTS[world_size]
    results = run_distributed(_runs, world_size, args=([_argv(corpus, *extra) for _, _, extra in cases],),
                              timeout=600)
    for rank_results in results[1:]:  # every rank returns the same numbers
        assert rank_results == results[0]
    for (what, embeddings, _), result in zip(cases, results[0]):
        _assert_same_run(result, references[embeddings], what)


def test_checkpoint_saved_at_pp2_tp2_resumes_at_pp1_and_pp4(corpus, references, tmp_path):
    save = str(tmp_path / "ckpt")
    saved = run_distributed(_runs, 4, args=([_argv(corpus, "--pp", "2", "--tp", "2", "--save", save,
                                                   "--exit-interval", str(ITERS // 2))],), timeout=300)[0][0]
    assert saved["iteration"] == ITERS // 2
    assert saved["losses"] == pytest.approx(references["tied"]["losses"][:ITERS // 2], rel=REL)

    # PP=1 x TP=1 continues training (weights, Adam state, LR schedule, data position) on the uninterrupted trajectory.
    (resumed,) = run_distributed(_runs, 1, args=([_argv(corpus, "--load", save)],), timeout=300)[0]
    assert resumed["losses"] == pytest.approx(references["tied"]["losses"][ITERS // 2:], rel=REL)
    assert resumed["final_valid"] == pytest.approx(references["tied"]["final_valid"], rel=REL)

    # PP=4 x TP=1, PP=2 x TP=2 (the saving layout) and PP=1 read the same weights: equal validation loss, 1e-6.
    evaluated = [run_distributed(_runs, world, args=([_argv(corpus, *extra, "--load", save, "--skip-train")],),
                                 timeout=300)[0][0]
                 for world, extra in ((4, ["--pp", "4"]), (4, ["--pp", "2", "--tp", "2"]), (1, []))]
    for result in evaluated:
        assert result["iteration"] == ITERS // 2 and result["losses"] == []
    assert evaluated[0]["final_valid"] == pytest.approx(evaluated[1]["final_valid"], rel=1e-6, abs=1e-6)
    assert evaluated[2]["final_valid"] == pytest.approx(evaluated[1]["final_valid"], rel=1e-6, abs=1e-6)
    assert evaluated[1]["final_valid"] == pytest.approx(saved["valid"][ITERS // 2], rel=1e-6)

    # And the other way: saved at PP=1, training continues at PP=4.
    save_pp1 = str(tmp_path / "ckpt-pp1")
    run_distributed(_runs, 1, args=([_argv(corpus, "--save", save_pp1, "--exit-interval", str(ITERS // 2))],),
                    timeout=300)
    resumed_pp4 = run_distributed(_runs, 4, args=([_argv(corpus, "--pp", "4", "--load", save_pp1)],), timeout=300)[0][0]
    assert resumed_pp4["losses"] == pytest.approx(references["tied"]["losses"][ITERS // 2:], rel=REL)

    # The tools' readers (evaluation, generation: load_model_for_inference; the converter: read_full_model_state)
    # see the whole model, every stage's parameters.
    names, mismatched = run_distributed(_compare_readers, 1, args=(save,))[0]
    assert {"embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
            "decoder.layers.3.mlp.linear_fc2.weight", "decoder.final_layernorm.weight"} <= names
    assert mismatched == []


def _compare_readers(save: str):
    parallel_state.initialize_model_parallel(1)
    model = load_model_for_inference(save)
    _, full, _ = read_full_model_state(save)
    vocab = model.config.vocab_size
    mismatched = [name for name, param in model.named_parameters()
                  if not torch.equal(param.detach()[:vocab] if name.startswith("embedding.word") else param.detach(),
                                     full[name])]
    return set(full), mismatched


def test_pipeline_runs_in_bf16_and_fp16_close_to_pp1(corpus):
    """Half precision at PP=2 follows its PP=1 run (the tied embeddings' two gradients meet in fp32 instead of
    in the parameter's dtype: a rounding apart) and trains."""
    half = [["--bf16"], ["--fp16", "--initial-loss-scale", "4096"]]
    references = run_distributed(_runs, 1, args=([_argv(corpus, *flags) for flags in half],), timeout=300)[0]
    pipelined = run_distributed(_runs, 2, args=([_argv(corpus, "--pp", "2", *half[0]),
                                                  _argv(corpus, "--pp", "2", "--use-distributed-optimizer",
                                                        *half[1])],), timeout=300)[0]
    for flags, result, reference in zip(half, pipelined, references):
        assert result["losses"] == pytest.approx(reference["losses"], rel=2e-2), flags
        assert result["losses"][-1] < result["losses"][0] - 0.1, flags
