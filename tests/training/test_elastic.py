"""Elastic training: a job whose world changes continues at a new layout on the same trajectory.

- two torchrun agents as two nodes (TP=2 x DP=2, local checkpoints every iteration): one agent is
  SIGKILLed by PID, the job continues at TP=2 x DP=1 and, when a fresh node joins, at TP=2 x DP=2
  again; every iteration's loss equals the uninterrupted TP=2 x DP=2 run's, at most the one
  iteration in flight is redone, and each restart is reported;
- --layout auto from 4 ranks to 2 to 4 (a pipeline-parallel layout at 4);
- a world that no layout fits waits for nodes, then exits with a message saying what it needs.
Local checkpoints (a kill while writing one, a lost node's buddy copy) are in test_local_checkpoint.py.
"""

import re

import pytest
from checkpoint_testing import build_corpus, run_pretrains, tiny_argv
from elastic_testing import ElasticJob
from launcher_testing import FAULT_ENTRY, REPO, TORCHRUN, finish, start

from megatronish.testing import run_distributed

ITERS = 30
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _assert_on_trajectory(losses: dict[int, list[float]], reference: list[float]) -> None:
    assert sorted(losses) == list(range(1, len(reference) + 1)), sorted(losses)
    for iteration, values in losses.items():
        for value in values:  # an iteration redone after a restart must give the same loss again
            assert value == pytest.approx(reference[iteration - 1], rel=RELATIVE_TOLERANCE), (iteration, values)


@pytest.mark.slow
def test_a_node_lost_and_a_node_joining_continue_the_uninterrupted_trajectory(corpus, tmp_path):
    argv = tiny_argv(corpus, "--log-interval", "1", iters=ITERS, tp=2)
    reference = run_distributed(run_pretrains, 4, args=([argv],), timeout=600)[0][0]["losses"]

    job = ElasticJob(tmp_path, [FAULT_ENTRY, *argv], nproc=2, max_nodes=2, STEP_DELAY=0.3,
                     RESULT_FILE=tmp_path / "result.json")
    local = ["--local-checkpoint-interval", "1", "--local-checkpoint-dir"]
    node_a = job.start_node(*local, str(tmp_path / "local-a"))
    node_b = job.start_node(*local, str(tmp_path / "local-b"))
    job.wait_for_step("TP 2 x PP 1 x DP 2", 4, timeout=400)
    job.kill_node(node_b, agent_only=True)  # its workers notice, and every rank saves and stops
    shrunk = job.wait_for(r"^elastic restart: layout TP 2 x PP 1 x DP 2 -> TP 2 x PP 1 x DP 1;.*", timeout=400)
    node_c = job.start_node(*local, str(tmp_path / "local-c"))  # a fresh node: an empty local folder
    grown = job.wait_for(r"^elastic restart: layout TP 2 x PP 1 x DP 1 -> TP 2 x PP 1 x DP 2;.*", timeout=400)
    codes = job.finish(timeout=600)
    output = job.output()

    assert codes[0] == 0 and codes[2] == 0, output[-5000:]
    _assert_on_trajectory(job.losses(), reference)
    for report in (shrunk, grown):
        redone = int(re.search(r"work lost: (\d+) iteration", report.group(0)).group(1))
        assert redone <= 1, report.group(0)  # at most the iteration in flight
        assert re.search(r"s failure detection, rendezvous and restart, .* s start-up, .* s load, .* s first step",
                         report.group(0))
    assert "of files sent to the nodes that lacked them" in output  # the fresh node received its part


@pytest.mark.slow
def test_layout_auto_follows_the_world_from_4_ranks_to_2_to_4(corpus, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MEGATRONISH_CACHE", str(tmp_path / "cache"))  # no goodput profile: datasheet constants
    # One attention head (TP 1) and a global batch of 4 micro-batches of 2 (DP <= 2): 4 ranks need PP 2.
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(corpus, "--num-attention-heads", "1", "--global-batch-size", "4", "--layout", "auto", iters=9)
    reference = run_distributed(run_pretrains, 4, args=([argv],), timeout=600)[0][0]
    capfd.readouterr()
    resumable = argv + ["--save", save, "--load", save]
    parts = [run_distributed(run_pretrains, world, args=([resumable + stop],), timeout=600)[0][0]
             for world, stop in ((4, ["--exit-interval", "3"]), (2, ["--exit-interval", "6"]), (4, []))]

    layouts = re.findall(r"^> parallelism: (TP \d+ x PP \d+ x DP \d+);", capfd.readouterr().out, flags=re.M)
    assert layouts == ["TP 1 x PP 2 x DP 2", "TP 1 x PP 1 x DP 2", "TP 1 x PP 2 x DP 2"]
    assert [part["iteration"] for part in parts] == [3, 6, 9]
    losses = [loss for part in parts for loss in part["losses"]]
    assert losses == pytest.approx(reference["losses"], rel=RELATIVE_TOLERANCE)
    assert parts[-1]["final_valid"] == pytest.approx(reference["final_valid"], rel=RELATIVE_TOLERANCE)


def test_a_world_that_no_layout_fits_waits_then_exits_saying_what_it_needs(corpus, tmp_path):
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "1", "--max-restarts", "1", str(REPO / "pretrain_gpt.py"),
               *tiny_argv(corpus, "--wait-for-nodes-minutes", "0.05", iters=2, tp=2)]
    proc = start(command, tmp_path / "log.txt", tmp_path)
    returncode = finish([proc], timeout=300)[0]
    output = (tmp_path / "log.txt").read_text()

    assert returncode not in (0, None), output[-3000:]
    assert "elastic: waiting for more nodes: --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1" in output
    assert "a world of 2 ranks would fit" in output
    assert "error: no node joined within --wait-for-nodes-minutes 0.05" in output
    assert "exitcode  : 3" in output  # torchrun's failure summary names the status
    # The restarted attempt waits only for what is left of the first attempt's 3 seconds.
    waits = re.findall(r"waiting up to (\d+) s more", output)
    assert len(waits) == 2 and int(waits[1]) <= 1, waits


def _args(*argv):
    from megatronish.training.arguments import parse_args

    return parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                       "--micro-batch-size", "2", "--global-batch-size", "8", *argv])


def test_resolve_layout_keeps_tp_and_pp_or_names_the_world_that_would_fit(monkeypatch):
    from megatronish.training.arguments import ArgumentError
    from megatronish.training.elastic import LayoutDoesNotFit, resolve_layout

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = _args("--tp", "2")
    resolve_layout(args, 4)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    with pytest.raises(LayoutDoesNotFit, match="does not divide the world size 2") as error:
        resolve_layout(_args("--tp", "2", "--pp", "2"), 2)
    assert error.value.needs().endswith("(this world has 2 ranks; a world of 4 ranks (2 nodes of 2) would fit)")
    with pytest.raises(LayoutDoesNotFit, match="not divisible by --micro-batch-size 2 x data-parallel size 3") as error:
        resolve_layout(_args("--tp", "2"), 6)
    assert "a world of 8 ranks" in error.value.needs()  # 4 would fit too, but torchrun only adds nodes
    with pytest.raises(ArgumentError) as error:  # no world fits 3 heads at TP 2: a plain argument error
        resolve_layout(_args("--tp", "2", "--num-attention-heads", "3", "--hidden-size", "48"), 2)
    assert not isinstance(error.value, LayoutDoesNotFit)


def test_resolve_layout_auto_asks_the_planner_for_each_world(monkeypatch, tmp_path):
    from megatronish.training.elastic import LayoutDoesNotFit, resolve_layout

    monkeypatch.setenv("MEGATRONISH_CACHE", str(tmp_path))
    for world in (1, 2, 4, 8):
        args = _args("--layout", "auto", "--tp", "8")
        resolve_layout(args, world)
        model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        assert world % model_parallel == 0 and 8 % (2 * world // model_parallel) == 0  # DP divides the batch
    with pytest.raises(LayoutDoesNotFit, match="fits 3 ranks") as error:
        resolve_layout(_args("--layout", "auto"), 3)
    assert "a world of 4 ranks would fit" in error.value.needs()


def test_local_checkpoint_flags_are_checked_before_any_work(tmp_path):
    from megatronish.training.arguments import ArgumentError, validate_args

    for argv, message in ((["--local-checkpoint-interval", "5"], "go together"),
                          (["--local-checkpoint-interval", "0", "--local-checkpoint-dir", str(tmp_path)], "positive"),
                          (["--local-checkpoint-interval", "5", "--local-checkpoint-dir", str(tmp_path),
                            "--save", str(tmp_path)], "is also --save"),
                          (["--wait-for-nodes-minutes", "-1"], ">= 0")):
        with pytest.raises(ArgumentError, match=message):
            validate_args(_args(*argv, "--tokenizer-type", "ByteTokenizer"), 1)
