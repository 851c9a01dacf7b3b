"""The serving engine: a background thread that decodes concurrent requests together.

Requests wait in a queue. For decoder-only models the thread runs lmforge's decode loop
(lmforge.inference.decode) with the queue as its source: waiting requests join the running batch as soon
as there is room, a finished one leaves at once, each keeps its own max_tokens, sampling settings and seed,
and tokens are streamed as they come. So 32 concurrent chats cost about as many forward passes as one, and
a new request does not wait for a long one to end. Beam search and encoder-decoder models run as static
``generate`` batches (a batch-aware streamer streams them).

Failure and back-pressure: the queue is bounded (``submit_all`` raises ``Busy`` when full); a cancelled job
(its client went away) leaves the batch at its next token; an exception in the thread fails the jobs it
held with a 500 and the loop starts again with a fresh batch, unless it keeps failing (``MAX_CRASHES`` within
``CRASH_WINDOW`` seconds): then the engine is unhealthy and refuses new jobs with a 503.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from lmforge.inference import decode, openmp
from lmforge.inference.generate import GenerationOptions, Generator, cut_at_stop


@dataclass(eq=False)  # compared and hashed by identity (the engine keeps a set of the jobs it holds)
class Job:
    """One sequence to generate; events go to ``events`` on the asyncio loop that submitted it."""

    prompt: list[int]
    opts: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # shared by the jobs of one request; events are (index, kind, value)
    index: int = 0  # the choice this job answers within its request
    seeded: bool = False  # the request set a seed: only jobs with the same seed share a batch
    stream: bool = False
    adapter: object = None  # the row_lora.RowAdapter this job decodes with (None: the base); held until it ends
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already streamed
    finished: bool = False
    cancelled: bool = False  # set from the server's loop when the client has gone; the engine drops the job

    def emit(self, kind: str, value) -> None:
        """Send an event; ``("error", (http_status, message))`` fails the job's request."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, kind, value))
        except RuntimeError:  # the request's event loop is closed (server shut down): nobody is listening
            pass

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


class Busy(Exception):
    """The queue is full: the request may be retried later (HTTP 429)."""


class Unavailable(Exception):
    """The engine has failed and no longer takes requests (HTTP 503)."""


MAX_CRASHES = 5  # exceptions in the engine thread within CRASH_WINDOW seconds before it gives up
CRASH_WINDOW = 60.0


class Engine:
    def __init__(self, generator: Generator, max_batch_size: int = 32, gather_seconds: float = 0.01,
                 max_queue: int | None = None, rows=None):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds  # how long an idle engine waits for more requests to join
        self.max_queue = max_queue  # jobs waiting for a batch slot at most (None: unbounded)
        self.queue: queue.Queue[Job] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.batches: list[int] = []  # sizes of the groups of requests started together (for tests and logs)
        self.held: set[Job] = set()  # jobs taken from the queue and not finished (touched by the thread only)
        self.cancelled = 0  # jobs dropped because their client went away
        self.restarts = 0  # exceptions the engine thread recovered from
        self.failure: str | None = None  # set when the engine gave up: it is unhealthy
        self._crashes: collections.deque[float] = collections.deque(maxlen=MAX_CRASHES)
        self._lock = threading.Lock()  # orders submissions against the engine giving up (no job left behind)
        self.decoder = None
        if decode.supports(generator.model):  # rows: a row_lora.RowLora applying each job's adapter to its row
            self.decoder = decode.Decoder(generator.model, generator.tok, max_batch_size, rows=rows)

    def start(self) -> None:
        """Start the engine thread (from the thread that loaded the model: its OpenMP pool is let go, see
        openmp.py, so the engine thread's is the only one)."""
        openmp.release_thread_pool()
        self.thread.start()

    def stop(self) -> None:
        """Finish the requests in progress, fail whatever still waits, and end the thread."""
        self.stopping.set()
        self.thread.join(timeout=60)
        self._fail_queued(503, "the server is shutting down")

    def healthy(self) -> bool:
        started = self.thread.ident is not None
        return self.failure is None and (not started or self.thread.is_alive() or self.stopping.is_set())

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue all of ``jobs`` or none: raises Unavailable when the engine has failed, Busy when the queue
        has no room for them."""
        with self._lock:
            if not self.healthy():
                raise Unavailable(self.failure or "the engine thread has stopped")
            if self.max_queue is not None and self.queue.qsize() + len(jobs) > self.max_queue:
                raise Busy(f"the server is busy: {self.queue.qsize()} sequences wait for a slot "
                           f"(at most {self.max_queue}); retry later")
            for job in jobs:
                if not job.seeded:
                    job.opts.seed = random.randrange(2**31)
                self.queue.put(job)

    def cancel(self, jobs: list[Job]) -> None:
        """Drop ``jobs`` (their client has gone): a waiting job is skipped, a decoding one leaves the batch at
        its next token. Jobs already finished are left alone."""
        for job in jobs:
            if not job.finished and not job.cancelled:
                job.cancelled = True
                self.cancelled += 1

    def largest_batch(self) -> int:
        return max(self.decoder.peak if self.decoder else 0, max(self.batches, default=0))

    def _gather(self, limit: int, wait: bool) -> list[Job]:
        """Up to ``limit`` waiting jobs (cancelled ones are dropped); when ``wait``, block a little for the
        first and let a burst gather. The jobs returned are ``held`` until they finish."""
        jobs: list[Job] = []
        timeout = 0.1
        while len(jobs) < limit:
            try:
                job = self.queue.get(timeout=timeout) if wait else self.queue.get_nowait()
            except queue.Empty:
                break
            timeout = self.gather_seconds
            if not job.cancelled:
                self.held.add(job)  # at once: if anything below fails, _recover answers it
                jobs.append(job)
        return jobs

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.decoder is not None:
                    self.decoder.run(self._take, on_token=self._on_token, on_done=self._on_done)
                else:
                    self._run_static(self._gather(self.max_batch_size, wait=True))
            except Exception as e:  # never leave a client waiting: fail what the loop held, then start again
                if not self._recover(e):
                    return

    def _recover(self, error: Exception) -> bool:
        """Fail the jobs the crashed loop held with a 500 and start a fresh batch; give up (unhealthy, every
        waiting job failed with a 503) when the loop failed MAX_CRASHES times within CRASH_WINDOW seconds."""
        print(f"[lmforge] the engine thread failed; the {len(self.held)} sequences it held get a 500:\n"
              f"{''.join(traceback.format_exception(error))}", file=sys.stderr, flush=True)
        message = f"generation failed: {type(error).__name__}: {error}"
        for job in self.held:
            job.finished = True
            job.emit("error", (500, message))
        self.held.clear()
        if self.decoder is not None:
            self.decoder._prefix = None  # it may be the half-built state that failed
        now = time.monotonic()
        self._crashes.append(now)
        if len(self._crashes) == MAX_CRASHES and now - self._crashes[0] < CRASH_WINDOW:
            with self._lock:
                self.failure = (f"the engine failed {MAX_CRASHES} times within {CRASH_WINDOW:.0f} s and stopped; "
                                f"last error: {message}")
            self._fail_queued(503, self.failure)
            return False
        self.restarts += 1
        return True

    def _fail_queued(self, status: int, message: str) -> None:
        while True:
            try:
                self.queue.get_nowait().emit("error", (status, message))
            except queue.Empty:
                return

    # ------------------------------------------------------------------- the decode loop's source and sinks
    def _take(self, limit: int, wait: bool):
        if self.stopping.is_set():
            return None  # the loop finishes what it has, then returns
        seqs = []
        for job in self._gather(limit, wait):
            if job.opts.num_beams > 1:  # beam search is transformers generate's; it runs now, on its own
                self._run_static([job])
                continue
            seqs.append(decode.Sequence(job.prompt, job.opts, frozenset(self.generator.eos_ids(job.opts)), job,
                                        adapter=job.adapter))
        if seqs:
            self.batches.append(len(seqs))
        return seqs

    def _on_token(self, seq: decode.Sequence, token: int) -> None:
        job = seq.handle
        if job.cancelled:  # a finished sequence leaves the batch at the end of this step (Decoder._advance)
            seq.finished = job.finished = True
            self.held.discard(job)
            return
        if job.stream and token not in seq.eos:
            text = stream_safe_text(self.generator.tok.decode(seq.ids, skip_special_tokens=True), job.opts.stop)
            if text.startswith(job.sent) and len(text) > len(job.sent):
                job.emit("delta", text[len(job.sent):])
                job.sent = text

    def _on_done(self, seq: decode.Sequence) -> None:
        job = seq.handle
        self.held.discard(job)
        if not job.cancelled:
            job.finished = True
            job.emit("done", self.generator.completion(seq))

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
                job.finished = True
                job.emit("error", (500, f"generation failed: {type(e).__name__}: {e}"))
            self.held.difference_update(jobs)
            return
        for job, result in zip(jobs, results):
            job.finished = True
            job.emit("done", result)
        self.held.difference_update(jobs)
