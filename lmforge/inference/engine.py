"""The serving engine: a background thread that batches concurrent requests into one ``generate`` call.

Requests wait in a queue; the thread takes everything waiting (up to ``max_batch_size``), groups requests
whose sampling settings agree, and runs each group as one left-padded batch. Rows keep their own
max_new_tokens (a per-row stopping criterion) and stream their tokens as they are produced (a batch-aware
streamer), so a batch of 32 chats costs about as many forward passes as one.

transformers has continuous batching (``generate_batch``), but it has no streaming and is built around
paged attention on GPUs; static batches per wave of requests are simple and fast on CPU.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
from dataclasses import dataclass, field

from lmforge.inference.generate import GenerationOptions, Generator, cut_at_stop


@dataclass
class Job:
    """One sequence to generate; events go to ``events`` on the asyncio loop that submitted it."""

    prompt: list[int]
    opts: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the jobs of one request; events are (index, kind, value)
    index: int = 0  # the choice this job answers within its request
    seeded: bool = False  # the request set a seed: only jobs with the same seed share a batch
    stream: bool = False
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already streamed
    finished: bool = False

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))

    def group_key(self) -> tuple:
        o = self.opts
        sampling = (o.temperature, o.top_p, o.top_k, o.seed if self.seeded else None) if o.do_sample else ()
        return (o.do_sample, sampling, o.num_beams, tuple(o.stop), tuple(o.eos_token_ids))


def stream_safe_text(text: str, stops: list[str]) -> str:
    """The part of ``text`` that can be streamed now: cut at a stop string, minus a tail that may still become
    one, and minus an incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives)."""
    text, stopped = cut_at_stop(text, stops)
    if stopped:
        return text
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd")


class BatchStreamer:
    """A transformers streamer for a whole batch: ``put`` gets the prompt once, then each step's (B,) tokens."""

    def __init__(self, jobs: list[Job], tokenizer, eos: set[int]):
        self.jobs, self.tok, self.eos = jobs, tokenizer, eos
        self.started = False

    def put(self, value) -> None:
        if not self.started:  # the first call carries the prompts
            self.started = True
            return
        for job, token in zip(self.jobs, value.view(-1).tolist()):
            if job.finished:
                continue
            job.ids.append(token)
            if token in self.eos or len(job.ids) >= job.opts.max_new_tokens:
                job.finished = True
            if job.stream and token not in self.eos:
                text = stream_safe_text(self.tok.decode(job.ids, skip_special_tokens=True), job.opts.stop)
                if text.startswith(job.sent) and len(text) > len(job.sent):
                    job.emit("delta", text[len(job.sent):])
                    job.sent = text

    def end(self) -> None:
        pass


class Engine:
    def __init__(self, generator: Generator, max_batch_size: int = 32, gather_seconds: float = 0.01):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds  # how long to wait for more requests to join a batch
        self.queue: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.batches: list[int] = []  # sizes of the batches run (for tests and logs)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, fail whatever still waits, and end the thread."""
        self.stopping.set()
        self.thread.join(timeout=60)
        while not self.queue.empty():
            self.queue.get_nowait().emit("error", "the server is shutting down")

    def submit(self, job: Job) -> None:
        if not job.seeded:
            job.opts.seed = random.randrange(2**31)
        self.queue.put(job)

    def _gather(self) -> list[Job]:
        try:
            jobs = [self.queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        while len(jobs) < self.max_batch_size:
            try:
                jobs.append(self.queue.get(timeout=self.gather_seconds))
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while not self.stopping.is_set():
            jobs = self._gather()
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self._run(group)

    def _run(self, jobs: list[Job]) -> None:
        opts = jobs[0].opts
        streamer = None
        if opts.num_beams == 1:  # transformers cannot stream beam search
            streamer = BatchStreamer(jobs, self.generator.tok, set(self.generator.eos_ids(opts)))
        self.batches.append(len(jobs))
        try:
            results = self.generator.generate([j.prompt for j in jobs], opts,
                                              row_limits=[j.opts.max_new_tokens for j in jobs], streamer=streamer)
        except Exception as e:  # a failed batch must answer its requests, not hang them
            for job in jobs:
                job.emit("error", f"generation failed: {e}")
            return
        for job, result in zip(jobs, results):
            job.emit("done", result)
