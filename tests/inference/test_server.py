"""tools/serve.py as a real process on a free 127.0.0.1 port, answered with the official `openai` client
(completions, streaming, stop strings, concurrent requests) and with raw HTTP for bad requests, at TP = 1 and
at TP = 2 under torchrun with a draft model; each server is torn down with its whole process tree.
The worker's batching is checked in process: requests queued together are generated as one batch."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the `serve` extra: pip install 'megatronish[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the `serve` extra: pip install 'megatronish[serve]'")
openai = pytest.importorskip("openai", reason="the server is tested with the official client: pip install openai")

from megatronish import parallel_state  # noqa: E402
from megatronish.data.tokenizers import ByteTokenizer  # noqa: E402
from megatronish.inference import Request, SamplingParams, generate  # noqa: E402
from megatronish.inference.text import TextGenerator, TextRequest  # noqa: E402
from megatronish.testing import find_free_port, run_distributed  # noqa: E402

from .conftest import TARGET, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["the cat ", "my friend ", "a dog looked "]
MAX_TOKENS = 24


def _library_greedy(states) -> list[str]:
    parallel_state.initialize_model_parallel(1)
    model = build_model(TARGET, states[0])
    requests = [Request(list(p.encode()), MAX_TOKENS, SamplingParams(temperature=0)) for p in PROMPTS]
    return [ByteTokenizer().detokenize(c.tokens) for c in generate(model, requests).completions]


@pytest.fixture(scope="module")
def expected_texts(trained_pair):
    return run_distributed(_library_greedy, 1, args=(trained_pair,))[0]


class Server:
    """A server process (a process group of its own, so that teardown reaches every process it started)."""

    def __init__(self, argv: list[str], launcher=(sys.executable,)):
        self.port = find_free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([*launcher, str(REPO / "tools" / "serve.py"), *argv, "--port", str(self.port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise AssertionError("the server did not answer within 120 s") from None
                time.sleep(0.3)

    def close(self) -> str:
        """SIGTERM to the whole group (torchrun passes it on), SIGKILL if it lingers; returns the output."""
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        output = self.proc.stdout.read()
        self.proc.stdout.close()
        try:  # nothing of the group may survive
            os.killpg(self.proc.pid, 0)
            survivors = True
        except ProcessLookupError:
            survivors = False
        assert not survivors, "processes of the server outlived its teardown"
        return output


@pytest.fixture(scope="module")
def server(trained_checkpoints):
    running = Server(["--load", trained_checkpoints[0], "--model-name", "tiny", "--max-batch-size", "4"])
    yield running
    running.close()


def _client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_and_models(server, expected_texts):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    response = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert response.choices[0].text == expected_texts[0]
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(PROMPTS[0]) and response.usage.completion_tokens == MAX_TOKENS
    batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected_texts


def test_openai_client_streaming_and_stop(server, expected_texts):
    client = _client(server)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True))
    assert len(chunks) > 2  # the text arrived in pieces
    assert "".join(c.choices[0].text for c in chunks) == expected_texts[0]
    assert chunks[-1].choices[0].finish_reason == "length"
    stop = expected_texts[1][5:8]
    stopped = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == expected_texts[1][:expected_texts[1].index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text
    sampled = [client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=s)
               .choices[0].text for s in (3, 3, 4)]
    assert sampled[0] == sampled[1]


def test_concurrent_clients_get_their_own_completions(server, expected_texts):
    client = _client(server)
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda p: client.completions.create(
            model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text, PROMPTS * 2))
    assert texts == expected_texts * 2


def _post(server, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body,status,fragment", [
    (b'{"model": "tiny", "prompt": "a"', 400, "not valid JSON"),
    (b'{"model": "gpt-4", "prompt": "a"}', 404, "the model 'gpt-4' does not exist"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 500}', 400, "exceed the model's 96 positions"),
    (b'{"model": "tiny", "prompt": "a", "temperature": -1}', 400, "temperature must be a number in [0, 2]"),
    (b'{"model": "tiny", "prompt": "a", "top_p": 0}', 400, "top_p must be in (0, 1]"),
    (b'{"model": "tiny", "prompt": 7}', 400, "prompt must be a string"),
    (b'{"model": "tiny", "prompt": "a", "n": 2}', 400, "n=2 is not supported"),
    (b'[1, 2]', 400, "must be a JSON object"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, expected_texts, body, status, fragment):
    code, answer = _post(server, body)
    assert code == status and fragment in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    code, answer = _post(server, json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                                             "temperature": 0}).encode())
    assert code == 200 and answer["choices"][0]["text"] == expected_texts[0]


@pytest.mark.slow
def test_tp2_server_with_a_draft_broadcasts_requests(trained_checkpoints, expected_texts):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    running = Server(["--tp", "2", "--load", trained_checkpoints[0], "--draft-load", trained_checkpoints[1],
                      "--model-name", "tiny", "--tree-size", "6", "--tree-depth", "3", "--calibration-tokens", "16"],
                     launcher=(torchrun, "--standalone", "--nproc_per_node", "2"))
    try:
        client = _client(running)
        batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0)
        assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected_texts
        code, _ = _post(running, b'{"model": "tiny", "prompt": "a", "max_tokens": 500}')
        assert code == 400
        chunks = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks) == expected_texts[0]
    finally:
        output = running.close()
    assert "Sequoia tree of" in output


def _batching(states):
    from megatronish.inference.server import GenerationWorker, _Job

    parallel_state.initialize_model_parallel(1)
    generator = TextGenerator(build_model(TARGET, states[0]), ByteTokenizer())
    worker = GenerationWorker(generator, max_batch_size=8)

    async def submit_all():
        loop = asyncio.get_running_loop()
        jobs = [_Job(TextRequest(p, MAX_TOKENS * (3 if i == 0 else 1), SamplingParams(temperature=0)), loop,
                     asyncio.Queue()) for i, p in enumerate(PROMPTS + PROMPTS)]
        for job in jobs:  # the first keeps the worker busy while the others queue up
            worker.submit(job)
        texts = []
        for job in jobs:
            while (event := await job.events.get())[0] == "text":
                pass
            texts.append(event[1].text)
        return texts

    try:
        texts = asyncio.run(submit_all())
    finally:
        worker.stop()
    return texts, worker.batch_sizes


def test_requests_queued_together_are_generated_as_one_batch(trained_pair, expected_texts):
    texts, batch_sizes = run_distributed(_batching, 1, args=(trained_pair,))[0]
    assert texts[1:] == expected_texts[1:] + expected_texts
    assert sum(batch_sizes) == 6 and max(batch_sizes) >= 4, batch_sizes
