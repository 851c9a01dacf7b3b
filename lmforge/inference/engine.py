"""The serving engine: a background thread that decodes concurrent requests together.

Requests wait in a queue. For decoder-only models the thread runs lmforge's decode loop
(lmforge.inference.decode) with the queue as its source: waiting requests join the running batch as soon
as there is room, a finished one leaves at once, each keeps its own max_tokens, sampling settings and seed,
and tokens are streamed as they come. So 32 concurrent chats cost about as many forward passes as one, and
a new request does not wait for a long one to end. Beam search and encoder-decoder models run as static
``generate`` batches (a batch-aware streamer streams them).
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
from dataclasses import dataclass, field

from lmforge.inference import decode
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
        self.gather_seconds = gather_seconds  # how long an idle engine waits for more requests to join
        self.queue: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.batches: list[int] = []  # sizes of the groups of requests started together (for tests and logs)
        self.decoder = None
        if decode.supports(generator.model):
            self.decoder = decode.Decoder(generator.model, generator.tok, max_batch_size)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish the requests in progress, fail whatever still waits, and end the thread."""
        self.stopping.set()
        self.thread.join(timeout=60)
        while not self.queue.empty():
            self.queue.get_nowait().emit("error", "the server is shutting down")

    def submit(self, job: Job) -> None:
        if not job.seeded:
            job.opts.seed = random.randrange(2**31)
        self.queue.put(job)

    def largest_batch(self) -> int:
        return max(self.decoder.peak if self.decoder else 0, max(self.batches, default=0))

    def _gather(self, limit: int, wait: bool) -> list[Job]:
        """Up to ``limit`` waiting jobs; when ``wait``, block a little for the first and let a burst gather."""
        try:
            jobs = [self.queue.get(timeout=0.1) if wait else self.queue.get_nowait()]
        except queue.Empty:
            return []
        while len(jobs) < limit:
            try:
                jobs.append(self.queue.get(timeout=self.gather_seconds) if wait else self.queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        if self.decoder is not None:
            self.decoder.run(self._take, on_token=self._on_token, on_done=self._on_done)
            return
        while not self.stopping.is_set():
            self._run_static(self._gather(self.max_batch_size, wait=True))

    # ------------------------------------------------------------------- the decode loop's source and sinks
    def _take(self, limit: int, wait: bool):
        if self.stopping.is_set():
            return None  # the loop finishes what it has, then returns
        seqs = []
        for job in self._gather(limit, wait):
            if job.opts.num_beams > 1:  # beam search is transformers generate's; it runs now, on its own
                self._run_static([job])
                continue
            seqs.append(decode.Sequence(job.prompt, job.opts, frozenset(self.generator.eos_ids(job.opts)), job))
        if seqs:
            self.batches.append(len(seqs))
        return seqs

    def _on_token(self, seq: decode.Sequence, token: int) -> None:
        job = seq.handle
        if job.stream and token not in seq.eos:
            text = stream_safe_text(self.generator.tok.decode(seq.ids, skip_special_tokens=True), job.opts.stop)
            if text.startswith(job.sent) and len(text) > len(job.sent):
                job.emit("delta", text[len(job.sent):])
                job.sent = text

    def _on_done(self, seq: decode.Sequence) -> None:
        seq.handle.emit("done", self.generator.completion(seq))

    # ------------------------------------------------------------------- static batches (generate)
    def _run_static(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:  # prompt-learning adapters: one prompt length per batch (see needs_equal_lengths)
            length = len(job.prompt) if self.generator.equal_lengths else None
            groups.setdefault((job.group_key(), length), []).append(job)
        for group in groups.values():
            self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
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
