"""`lmforge chat`: an interactive conversation with a model in the terminal, answers streamed as they are decoded.

``Chat`` keeps the conversation (an optional system message, then user/assistant turns), renders it with the
model's chat template each turn (``render_prompt``, as `generate` and `serve` do) and writes the answer to its
output stream piece by piece. It reads lines from its input stream: text is a user turn; ``/system TEXT``,
``/reset``, ``/exit`` and ``/help`` are commands; end of input quits; Ctrl-C while an answer streams stops that
answer (what was shown stays in the conversation) and returns to the prompt.

Decoding is not written again here. With the hf backend an answer is a streamed job of the serving ``Engine``,
the path `lmforge serve` streams chat completions through: lmforge's decode loop (or ``generate`` with a
streamer for models the loop does not cover), text released by ``stream_safe_text`` (never half a character
or the start of a stop string), and a stopped answer cancelled as a disconnecting client's is. With vLLM its
engine is stepped here, because ``LLM.generate`` returns whole answers only.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TextIO

from lmforge.errors import ConfigError
from lmforge.inference.adapter_set import AdapterSet
from lmforge.inference.backends import HfBackend
from lmforge.inference.engine import Engine, Job, stream_safe_text
from lmforge.inference.generate import Completion, GenerationOptions, Generator, render_prompt

PROMPT = ">>> "
HELP = ("/system TEXT sets the system prompt (/system alone clears it), /reset clears the conversation, "
        "/model NAME answers with an --adapter (or the base; /model alone lists them), "
        "/exit (or Ctrl-D) quits, /help shows this; Ctrl-C stops an answer")


class GenerationFailed(Exception):
    """The model failed on one answer; the session goes on."""


def context_length(config) -> int | None:
    """Positions the model can attend to (None: no limit known)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class EngineAnswers:
    """Answers from lmforge's serving Engine (hf backend), one streamed job at a time.

    The Engine reports a job's events on an asyncio queue; this class runs its own private event loop just
    long enough to take each event, so the chat itself stays plain blocking code.
    """

    def __init__(self, generator: Generator, adapters: AdapterSet | None = None):
        self.tokenizer = generator.tok
        self.context = context_length(generator.model.config)
        self.base = str(generator.loaded.name)
        self.adapters, self.adapter = adapters, None  # the adapter answers decode with (None: the base)
        self.engine = Engine(generator, max_batch_size=1,  # one conversation: one sequence at a time
                             rows=adapters.rows if adapters else None)
        self._loop = asyncio.new_event_loop()
        self.engine.start()

    def answer(self, prompt: list[int], opts: GenerationOptions, seeded: bool, on_text: Callable[[str], None]
               ) -> Completion:
        """Generate the answer to ``prompt``, calling ``on_text`` with each new piece of text. An exception
        raised meanwhile (KeyboardInterrupt from Ctrl-C, or from ``on_text``) cancels the job."""
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt, opts, self._loop, events, seeded=seeded, stream=True, adapter=self.adapter)
        sent, caught = "", False
        try:
            caught = self._interrupt_as_event(events)
            self.engine.submit(job)
            while True:
                _, kind, value = self._loop.run_until_complete(events.get())
                if kind == "interrupt":
                    raise KeyboardInterrupt
                if kind == "error":
                    raise GenerationFailed(value[1])
                if kind == "delta":
                    on_text(value)
                    sent += value
                    continue
                # "done": the final text may hold what streaming kept back (a stop string that was not)
                rest = value.text[len(sent):] if value.text.startswith(sent) else ""
                if rest:
                    on_text(rest)
                return value
        finally:
            if caught:
                self._loop.remove_signal_handler(signal.SIGINT)  # back to KeyboardInterrupt
            if not job.finished:
                self.engine.cancel([job])  # it leaves the batch at its next token

    def models(self) -> list[str]:
        """The base, then each adapter (``--adapter``): what ``use`` takes."""
        return [self.base] + [name for name, _ in self.adapters.names()] if self.adapters else [self.base]

    def use(self, name: str) -> None:
        self.adapter = None if name == self.base else self.adapters.get(name)

    def _interrupt_as_event(self, events: asyncio.Queue) -> bool:
        """Ctrl-C becomes an event on this answer's queue, so KeyboardInterrupt is raised between events, never
        inside the loop: there it could cut off ``events.get()`` before the loop ran it, and Python prints
        "coroutine 'Queue.get' was never awaited" under "[answer stopped]" (seen in a test). Off the main
        thread signals cannot be caught this way: Ctrl-C then raises wherever it lands, as before."""
        try:
            self._loop.add_signal_handler(signal.SIGINT, events.put_nowait, (None, "interrupt", None))
        except (RuntimeError, ValueError):  # not the main thread (set_wakeup_fd), or a closed loop
            return False
        return True

    def close(self) -> None:
        self.engine.stop()
        self._loop.close()


class VllmAnswers:
    """Answers from vLLM's engine (``LLM.llm_engine``), stepped here to stream: ``add_request``, ``step``
    (cumulative text per request) and ``abort_request``, an API vLLM has kept across its engine versions."""

    def __init__(self, backend):
        self.tokenizer = backend.tokenizer
        self.engine = backend.llm.llm_engine
        self.context = self.engine.model_config.max_model_len
        self._ids = itertools.count()
        self.name = backend.name

    def models(self) -> list[str]:
        return [self.name]

    def use(self, name: str) -> None:
        pass  # one model only (--adapter is refused with --backend vllm)

    def answer(self, prompt: list[int], opts: GenerationOptions, seeded: bool, on_text: Callable[[str], None]
               ) -> Completion:
        from vllm import SamplingParams

        sample = opts.do_sample and opts.temperature > 0
        params = SamplingParams(max_tokens=opts.max_new_tokens, temperature=opts.temperature if sample else 0.0,
                                top_p=opts.top_p if sample else 1.0, top_k=(opts.top_k or -1) if sample else -1,
                                stop=list(opts.stop) or None, stop_token_ids=list(opts.eos_token_ids) or None,
                                seed=opts.seed if seeded else None)
        rid = f"chat-{next(self._ids)}"
        self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        sent, finished = "", False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    o, finished = out.outputs[0], out.finished
                    text = o.text if finished else stream_safe_text(o.text, opts.stop)
                    if text.startswith(sent) and len(text) > len(sent):
                        on_text(text[len(sent):])
                        sent = text
            return Completion(o.text, "length" if o.finish_reason == "length" else "stop", len(o.token_ids),
                              len(prompt), list(o.token_ids))
        finally:
            if not finished:
                self.engine.abort_request([rid])

    def close(self) -> None:
        pass


def open_answers(backend, adapters: dict[str, str] | None = None) -> EngineAnswers | VllmAnswers:
    """The streaming answerer for a backend from ``lmforge.inference.backends.load_backend``; ``adapters``
    (name -> directory, hf backend) are read over its model for ``/model NAME``."""
    if not isinstance(backend, HfBackend):
        return VllmAnswers(backend)
    named = AdapterSet(backend.loaded) if adapters else None
    for name, root in (adapters or {}).items():
        named.add(name, root)
    return EngineAnswers(backend.generator, named)


class Chat:
    """One conversation: reads lines from ``stdin``, writes prompts and streamed answers to ``stdout``.

    ``seed``: None = every sampled answer draws a fresh seed; N = answer k samples with seed N + k, so a
    session replayed with the same inputs gives the same answers. Greedy decoding (temperature 0) ignores it.
    """

    def __init__(self, answers, opts: GenerationOptions, system: str | None = None, seed: int | None = None,
                 stdin: TextIO | None = None, stdout: TextIO | None = None):
        if not answers.tokenizer.chat_template:
            raise ConfigError("--model: the tokenizer has no chat template, so a conversation cannot be rendered "
                              "(a base model? use `lmforge generate` with raw prompts)")
        self.answers, self.opts = answers, opts
        self.system = system or None
        self.seed = seed
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.history: list[dict] = []  # user and assistant messages, in order
        self.model = answers.models()[0]  # what answers: the base, or an adapter (/model NAME)
        self.last_prompt: str | None = None  # the text the model was given for the latest answer
        self.turns = 0

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    # --------------------------------------------------------------------------------------------- one turn
    def ask(self, text: str) -> Completion | None:
        """Send a user turn, stream the answer to the output and add both to the history. Returns the
        completion (None when the turn could not be sent or was stopped)."""
        user = {"role": "user", "content": text}
        tok = self.answers.tokenizer
        try:
            rendered, special = render_prompt({"messages": self.messages() + [user]}, tok)
        except Exception as e:  # jinja2 TemplateError: e.g. a template that refuses a system message
            self._say(f"[the chat template refused this conversation: {e}]")
            return None
        prompt = tok(rendered, add_special_tokens=special).input_ids
        opts = self._options(len(prompt))
        if opts is None:
            return None
        self.last_prompt = rendered
        shown: list[str] = []

        def show(piece: str) -> None:
            self.stdout.write(piece)
            self.stdout.flush()
            shown.append(piece)

        try:
            result = self.answers.answer(prompt, opts, self.seed is not None, show)
        except KeyboardInterrupt:
            self._say("\n[answer stopped]")
            result = None
        except GenerationFailed as e:
            self._say(f"\n[{e}]")
            return None
        else:
            self._say("")
        self.turns += 1
        self.history += [user, {"role": "assistant", "content": result.text if result else "".join(shown)}]
        return result

    def _options(self, prompt_tokens: int) -> GenerationOptions | None:
        """This turn's options: the seed for turn k, max_new_tokens cut to the room the context leaves."""
        opts = replace(self.opts, seed=(self.seed or 0) + self.turns)
        context = self.answers.context
        if context:
            room = context - prompt_tokens
            if room < 1:
                self._say(f"[the conversation is {prompt_tokens} tokens long and the model's context is {context}: "
                          "/reset to start a new one]")
                return None
            opts.max_new_tokens = min(opts.max_new_tokens, room)
        return opts

    # --------------------------------------------------------------------------------------------- the loop
    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.ask(text)
            return True
        command, _, arg = text.partition(" ")
        if command == "/exit":
            return False
        if command == "/reset":
            self.history = []
            self._say("[conversation cleared]")
        elif command == "/system":
            self.system = arg.strip() or None
            self._say("[system prompt set]" if self.system else "[system prompt cleared]")
        elif command == "/model":
            self._use(arg.strip())
        elif command == "/help":
            self._say(HELP)
        else:
            self._say(f"[unknown command {command}: {HELP}]")
        return True

    def _use(self, name: str) -> None:
        """Answer with the model ``name`` from now on (the conversation stays); no name: list them."""
        names = self.answers.models()
        if name and name in names:
            self.answers.use(name)
            self.model = name
            self._say(f"[answering with {name}]")
        else:
            unknown = f"unknown model {name}; " if name else ""
            self._say(f"[{unknown}models: {', '.join(names)}; answering with {self.model}]")

    def run(self) -> int:
        """Read and answer lines until /exit or end of input. Ctrl-C at the prompt only clears the line;
        during an answer ``ask`` handles it; a Ctrl-C just before or after the answer drops that turn."""
        while True:
            try:
                line = self._read()
                if line is None:
                    self._say("")
                    return 0
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:
                self._say("\n[/exit or Ctrl-D quits]")

    def _read(self) -> str | None:
        """One input line without its newline; None at end of input. A terminal on the process's own
        stdin/stdout goes through ``input()``, so line editing works (with ``readline`` imported)."""
        if self.stdin is sys.stdin and self.stdout is sys.stdout and sys.stdin.isatty():
            try:
                return input(PROMPT)
            except EOFError:
                return None
        self.stdout.write(PROMPT)
        self.stdout.flush()
        line = self.stdin.readline()
        return line.rstrip("\n") if line else None

    def _say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()
