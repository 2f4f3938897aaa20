"""Generation on a trained tiny target and draft: plain KV-cached greedy decoding equals greedy
decoding by full recomputation; batched equals one by one; speculative greedy decoding (a chain
and a Sequoia tree) equals plain greedy token for token; all of it at TP = 1 and TP = 2.
Then sampling, stopping, streaming and the errors."""

import pytest
import torch

from megatronish import parallel_state
from megatronish.inference import Request, SamplingParams, TokenTree, generate, without_sequence_parallel
from megatronish.inference.sequoia import best_tree
from megatronish.model import GPTModel, TransformerConfig
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region
from megatronish.testing import run_distributed

from .conftest import DRAFT, TARGET, build_model

PROMPTS = [b"the cat ", b"my friend found ", b"zq"]
NEW_TOKENS = 40
GREEDY = SamplingParams(temperature=0)
TREES = {"chain": TokenTree.chain(3), "sequoia": best_tree([0.5, 0.25, 0.1], size=10, max_depth=4)}


def _requests(sampling=GREEDY, **kwargs):
    return [Request(list(p), NEW_TOKENS, sampling, **kwargs) for p in PROMPTS]


def _recomputed_greedy(model, prompt: list[int]) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = gather_from_tensor_model_parallel_region(model(torch.tensor([tokens])))[0, -1]
            tokens.append(int(logits[:model.config.vocab_size].argmax()))
    return tokens[len(prompt):]


def _greedy_runs(states):
    parallel_state.initialize_model_parallel(torch.distributed.get_world_size())
    target, draft = build_model(TARGET, states[0]), build_model(DRAFT, states[1])
    runs = {"batched": [c.tokens for c in generate(target, _requests()).completions],
            "one_by_one": [generate(target, [r]).completions[0].tokens for r in _requests()],
            "recomputed": [_recomputed_greedy(target, list(p)) for p in PROMPTS]}
    stats = {}
    for name, tree in TREES.items():
        out = generate(target, _requests(), draft=draft, tree=tree)
        runs[name], stats[name] = [c.tokens for c in out.completions], out.stats
    return runs, stats


@pytest.fixture(scope="module")
def greedy_runs(trained_pair):
    return {tp: run_distributed(_greedy_runs, tp, args=(trained_pair,))[0] for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_cached_greedy_equals_recomputation_and_batching_changes_nothing(greedy_runs, tp):
    runs, _ = greedy_runs[tp]
    assert all(len(tokens) == NEW_TOKENS for tokens in runs["batched"])
    assert runs["batched"] == runs["recomputed"]
    assert runs["one_by_one"] == runs["recomputed"]
    assert runs["batched"] == greedy_runs[1][0]["batched"]  # TP = 2 decodes what TP = 1 does


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tree", sorted(TREES))
def test_speculative_greedy_equals_plain_greedy(greedy_runs, tp, tree):
    runs, stats = greedy_runs[tp]
    assert runs[tree] == runs["batched"]
    # The comparison means something only if the draft was both right and wrong along the way.
    reached = stats[tree].depth_reached
    assert len(reached) >= 2 and reached[1] > 0, f"no step accepted two draft tokens: {stats[tree].summary()}"
    assert stats[tree].depth_tried[0] > reached[0], f"the draft was never rejected: {stats[tree].summary()}"
    assert stats[tree].tokens_per_forward > 1.2, stats[tree].summary()


def _sampling_and_streaming(states):
    parallel_state.initialize_model_parallel(1)
    target, draft = build_model(TARGET, states[0]), build_model(DRAFT, states[1])
    sampling = SamplingParams(temperature=0.9, top_k=20, top_p=0.95)
    out = {}
    for name, kwargs in (("plain", {}), ("tree", dict(draft=draft, tree=TREES["sequoia"]))):
        out[name, "seed 0"] = [c.tokens for c in generate(target, _requests(sampling, seed=0), **kwargs).completions]
        out[name, "seed 0 again"] = [c.tokens for c in generate(target, _requests(sampling, seed=0), **kwargs).completions]
        out[name, "seed 1"] = [c.tokens for c in generate(target, _requests(sampling, seed=1), **kwargs).completions]
        streamed = {}
        stop_at = ord(".")
        completions = generate(target, _requests(GREEDY, stop_token_ids=[stop_at]),
                               on_tokens=lambda i, new: streamed.setdefault(i, []).extend(new), **kwargs).completions
        out[name, "stop"] = [(c.tokens, c.finish_reason, streamed.get(i, [])) for i, c in enumerate(completions)]
        halted = generate(target, _requests(GREEDY), on_tokens=lambda i, new: i == 1, **kwargs).completions
        out[name, "halted"] = [(len(c.tokens), c.finish_reason) for c in halted]
    out["zero"] = generate(target, [Request([1, 2], 0)]).completions[0]
    return out


def test_sampling_is_seeded_and_streaming_and_stopping_work(trained_pair):
    out = run_distributed(_sampling_and_streaming, 1, args=(trained_pair,))[0]
    for name in ("plain", "tree"):
        assert out[name, "seed 0"] == out[name, "seed 0 again"]
        assert out[name, "seed 0"] != out[name, "seed 1"]
        for tokens, reason, streamed in out[name, "stop"]:
            assert streamed == tokens and ord(".") not in tokens
            assert reason == ("stop" if len(tokens) < NEW_TOKENS else "length")
        assert any(reason == "stop" for _, reason, _ in out[name, "stop"])
        lengths_and_reasons = out[name, "halted"]
        assert lengths_and_reasons[1][1] == "stop" and lengths_and_reasons[1][0] < NEW_TOKENS
        assert lengths_and_reasons[0] == (NEW_TOKENS, "length")
    assert out["zero"].tokens == [] and out["zero"].finish_reason == "length"


def _errors(states):
    parallel_state.initialize_model_parallel(2)
    target, draft = build_model(TARGET, states[0]), build_model(DRAFT, states[1])
    other_vocab = GPTModel(TransformerConfig(**dict(DRAFT, vocab_size=100)))
    sequence_parallel = GPTModel(TransformerConfig(**dict(TARGET, sequence_parallel=True)))
    messages = []
    for call in (lambda: generate(target, [Request([1] * 90, 7)]),
                 lambda: generate(target, [Request([1, 999], 3)]),
                 lambda: generate(target, [Request([1], 3)], draft=other_vocab),
                 lambda: generate(sequence_parallel, [Request([1], 3)]),
                 lambda: generate(target, [Request([1], 3)], tree=TokenTree.chain(2)),
                 lambda: Request([], 3),
                 lambda: SamplingParams(temperature=-1),
                 lambda: SamplingParams(top_p=0),
                 lambda: SamplingParams(top_k=1.5)):
        try:
            call()
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    twin = without_sequence_parallel(sequence_parallel)
    shared = all(a is b or a.data_ptr() == b.data_ptr() for a, b in zip(twin.parameters(), sequence_parallel.parameters()))
    return messages, shared, generate(twin, [Request([1, 2], 3)]).completions[0].tokens


def test_bad_requests_fail_first_with_the_fix(trained_pair):
    messages, shared, twin_tokens = run_distributed(_errors, 2, args=(trained_pair,))[0]
    expected = ["request 0: the prompt's 90 tokens plus max_new_tokens 7 exceed the model's 96 positions: "
                "shorten the prompt or ask for at most 6 new tokens",
                "request 0: token id 999 is outside the model's vocabulary [0, 258)",
                "the draft model's vocabulary has 100 tokens, the target's 258",
                "pass without_sequence_parallel(model) (same weights)",
                "a speculation tree needs a draft model",
                "the prompt is empty",
                "temperature must be a finite number >= 0 (0 = greedy), got -1",
                "top_p must be in (0, 1] (1 = no nucleus cut), got 0",
                "top_k must be an integer >= 0 (0 = no top-k cut), got 1.5"]
    for message, fragment in zip(messages, expected):
        assert message is not None and fragment in message, (message, fragment)
    assert shared and len(twin_tokens) == 3
