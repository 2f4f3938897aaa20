"""An OpenAI-compatible HTTP server for a megatronish model (FastAPI + uvicorn: the `serve` extra).

    POST /v1/completions   {"model", "prompt" (a string or a list of them), "max_tokens" (16),
                            "temperature" (1), "top_p" (1), "top_k" (0, an extension), "stop",
                            "seed", "stream"} -> a text_completion, or server-sent events with
                            "stream": true (chunks of new text, then "data: [DONE]")
    GET  /v1/models        the one model served

The HTTP side (an asyncio loop on rank 0) checks and tokenizes each request and queues it; a
worker thread takes everything queued (up to --max-batch-size prompts) as one batch and runs
TextGenerator.complete on it, streaming text back to the loop as it is generated. At TP > 1 the
worker first broadcasts the batch to the other ranks, which run the same generation in lockstep
(`follow`); when idle it broadcasts a heartbeat now and then, so that their wait never times out.
A request that cannot be served gets a 4xx with an OpenAI-style error body
({"error": {"message", "type", "param", "code"}}) before anything is queued; the server goes on.
With a draft model, speculative decoding serves the prompts of a batch one after another.
"""

import asyncio
import json
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass

import torch.distributed as dist
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from megatronish.inference.sampling import SamplingParams
from megatronish.inference.text import TextCompletion, TextGenerator, TextRequest

HEARTBEAT_SECONDS = 5.0
MAX_STOP_STRINGS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def parse_completion_request(body, model_name: str) -> tuple[list[TextRequest], bool]:
    """The prompts of a /v1/completions body and whether to stream; APIError for anything unservable."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") != model_name:
        raise APIError(404, f"the model {body.get('model')!r} does not exist: this server serves {model_name!r}",
                       "model", "model_not_found")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty list of strings", "prompt")
    for name, supported in (("n", 1), ("best_of", 1), ("echo", False), ("logprobs", None), ("suffix", None)):
        if body.get(name, supported) not in (supported, None):
            raise APIError(400, f"{name}={body[name]!r} is not supported by this server (only {supported!r})", name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    try:
        sampling = SamplingParams(temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                                  top_p=float(_number(body, "top_p", 1.0, 0, 1)),
                                  top_k=_number(body, "top_k", 0, 0, 1 << 30, integer=True))
    except ValueError as error:  # top_p = 0
        raise APIError(400, str(error), "top_p") from None
    max_tokens = _number(body, "max_tokens", 16, 0, 1 << 30, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    seed = random.randrange(1 << 31) if seed is None else seed
    return [TextRequest(p, max_tokens, sampling, seed + i, tuple(stop)) for i, p in enumerate(prompts)], stream


@dataclass
class _Job:
    request: TextRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", str) as it is generated, then ("done", TextCompletion) or ("error", str)

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


_STOP = "stop"


class GenerationWorker:
    """The thread that batches queued jobs and generates them (and, at TP > 1, leads the other ranks)."""

    def __init__(self, generator: TextGenerator, max_batch_size: int):
        self.generator, self.max_batch_size = generator, max_batch_size
        self.jobs: queue.Queue = queue.Queue()
        self.batch_sizes: list[int] = []  # of every batch generated so far
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(_STOP)
        self.thread.join()

    def _run(self) -> None:
        while True:
            try:
                batch = [self.jobs.get(timeout=HEARTBEAT_SECONDS)]
            except queue.Empty:
                _broadcast(("heartbeat",))
                continue
            while batch[-1] is not _STOP and len(batch) < self.max_batch_size and not self.jobs.empty():
                batch.append(self.jobs.get())
            jobs = [job for job in batch if job is not _STOP]
            if jobs:
                self._generate(jobs)
            if batch[-1] is _STOP:
                _broadcast((_STOP,))
                return

    def _generate(self, jobs: list[_Job]) -> None:
        requests = [job.request for job in jobs]
        _broadcast(("batch", requests))
        self.batch_sizes.append(len(requests))
        try:
            completions, _ = self.generator.complete(requests, lambda index, text: jobs[index].put("text", text))
        except Exception as error:  # noqa: BLE001 - the HTTP side answers 500 and the server goes on
            for job in jobs:
                job.put("error", f"generation failed: {error}")
            return
        for job, completion in zip(jobs, completions):
            job.put("done", completion)


def _broadcast(message):
    """Rank 0's message on every rank (nothing to do in a world of one)."""
    if dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def follow(generator: TextGenerator) -> None:
    """Ranks other than 0: run every batch rank 0 broadcasts, until it says stop."""
    while True:
        message = _broadcast(None)
        if message[0] == _STOP:
            return
        if message[0] == "batch":
            generator.complete(message[1])


def create_app(worker: GenerationWorker, model_name: str) -> FastAPI:
    app = FastAPI(title="megatronish", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "megatronish"}]}

    @app.post("/v1/completions")
    async def completions(http: Request):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        requests, stream = parse_completion_request(body, model_name)
        try:
            token_counts = [len(r.prompt) for r in worker.generator.token_requests(requests)]
        except ValueError as error:
            raise APIError(400, str(error), "prompt", "invalid_prompt") from None
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, loop, asyncio.Queue()) for r in requests]
        for job in jobs:
            worker.submit(job)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": model_name}
        if stream:
            return StreamingResponse(_events(jobs, header), media_type="text/event-stream")
        results = [await _result(job) for job in jobs]
        return {**header, "choices": [_choice(i, c.text, c.finish_reason) for i, c in enumerate(results)],
                "usage": _usage(token_counts, results)}

    return app


def _choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def _usage(prompt_tokens: list[int], results: list[TextCompletion]) -> dict:
    completion_tokens = sum(c.completion_tokens for c in results)
    return {"prompt_tokens": sum(prompt_tokens), "completion_tokens": completion_tokens,
            "total_tokens": sum(prompt_tokens) + completion_tokens}


async def _result(job: _Job) -> TextCompletion:
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise APIError(500, value, kind="server_error")


async def _events(jobs: list[_Job], header: dict):
    """Server-sent events: each prompt's text as it comes, its finish reason, then [DONE]."""
    for index, job in enumerate(jobs):
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                return
            finished = kind == "done"
            chunk = _choice(index, "" if finished else value, value.finish_reason if finished else None)
            yield f"data: {json.dumps({**header, 'choices': [chunk]})}\n\n"
            if finished:
                break
    yield "data: [DONE]\n\n"
