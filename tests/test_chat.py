"""`lmforge chat` on the tiny model: a real pseudo-terminal session (history, /reset, /system, /exit), streamed
greedy answers equal to `lmforge generate`, Ctrl-C stopping an answer, and the clear errors."""

from __future__ import annotations

import fcntl
import importlib.util
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import write_jsonl

from lmforge.cli import main
from lmforge.inference.chat import PROMPT, Chat, EngineAnswers
from lmforge.inference.generate import GenerationOptions, Generator, encode_prompt
from lmforge.inference.loading import load_for_inference

GREEDY = GenerationOptions(max_new_tokens=12)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def answers(sharp_model_dir):
    """The chat's streaming answerer on the sharp tiny model (peaked attention, so history changes answers)."""
    a = EngineAnswers(Generator(load_for_inference(str(sharp_model_dir), dtype="float32")))
    yield a
    a.close()


@pytest.fixture(scope="module")
def reference(sharp_model_dir):
    """Greedy answers as `lmforge generate` computes them (its Generator path), from a separate model copy."""
    gen = Generator(load_for_inference(str(sharp_model_dir), dtype="float32"))

    def greedy(messages: list[dict]) -> str:
        prompt = encode_prompt({"messages": messages}, gen.tok)
        return gen.generate_all([prompt], GREEDY)[0].text

    return greedy


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _session(answers, messages: list[dict], out=None) -> Chat:
    """A Chat holding ``messages`` (a system message first, if any) as its conversation so far."""
    chat = Chat(answers, GREEDY, stdout=out or io.StringIO())
    if messages and messages[0]["role"] == "system":
        chat.system, messages = messages[0]["content"], messages[1:]
    chat.history = list(messages)
    return chat


CONVERSATIONS = [
    [_user("the quick brown fox")],
    [{"role": "system", "content": "extract json"}, _user("name and age of the lazy dog")],
    [_user("alpha beta"), _assistant("gamma delta"), _user("seven wizards judge boxing matches")],
    [{"role": "system", "content": "you are a record"}, _user("city"), _assistant("works"), _user("job text")],
]


class _Recorder(io.StringIO):
    """An output that keeps each piece of answer written to it (the chat's own lines end with a newline)."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s):
        if s and not s.endswith("\n"):
            self.pieces.append(s)
        return super().write(s)


class _InterruptingOutput(_Recorder):
    """An output on which the third streamed piece raises KeyboardInterrupt, as Ctrl-C would mid-answer."""

    interrupted = False

    def write(self, s):
        if len(self.pieces) == 2 and not self.interrupted and s and not s.endswith("\n"):
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(s)


def test_streamed_greedy_answers_equal_lmforge_generate(tmp_path, sharp_model_dir, answers):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": m} for m in CONVERSATIONS])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(sharp_model_dir), "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "12", "--dtype", "float32", "--no-progress"]) == 0
    expected = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert len(set(expected)) == len(expected) and all(expected)  # the rows are told apart: a mix-up would show

    for messages, want in zip(CONVERSATIONS, expected):
        stream = _Recorder()
        chat = _session(answers, messages[:-1], stream)
        result = chat.ask(messages[-1]["content"])
        assert stream.getvalue() == want + "\n"  # what was streamed is the whole answer
        assert len(stream.pieces) > 2  # written piece by piece as it was decoded, not at the end
        assert result.text == want
        assert chat.history[-2:] == [messages[-1], _assistant(want)]


def test_prompt_tuning_adapter_streams_through_generate(tmp_path, sharp_model_dir):
    """A prompt-tuning adapter dir stays a PEFT model (not merged), which the decode loop does not cover: its
    answers stream through transformers generate (the engine's static path) and still equal `lmforge generate`."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "prompt-adapter"
    base = AutoModelForCausalLM.from_pretrained(sharp_model_dir)
    get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(sharp_model_dir).save_pretrained(adapter)
    messages = CONVERSATIONS[2]
    inp = write_jsonl(tmp_path / "in.jsonl", [{"messages": messages}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(adapter), "--input", str(inp), "--output", str(out),
                 "--max-new-tokens", "12", "--dtype", "float32", "--no-progress"]) == 0
    want = json.loads(out.read_text())["completion"]

    answers = EngineAnswers(Generator(load_for_inference(str(adapter), dtype="float32")))
    try:
        assert answers.engine.decoder is None  # so this is the generate path, not the decode loop
        stream = _Recorder()
        result = _session(answers, messages[:-1], stream).ask(messages[-1]["content"])
    finally:
        answers.close()
    assert result.text == want and stream.getvalue() == want + "\n"
    assert len(stream.pieces) > 2


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(answers, reference):
    out = _InterruptingOutput()
    chat = Chat(answers, GREEDY, stdout=out)
    assert chat.ask("the quick brown fox") is None
    full = reference([_user("the quick brown fox")])
    shown = chat.history[1]["content"]
    assert "[answer stopped]" in out.getvalue()
    assert shown and full.startswith(shown) and shown != full  # the part shown is kept, the rest never came
    # the cancelled job left the engine: the next answer comes, and it sees the stopped turn in its history
    result = chat.ask("alpha beta")
    assert result is not None
    assert result.text == reference([_user("the quick brown fox"), _assistant(shown), _user("alpha beta")])


# ------------------------------------------------------------------------------------------- the terminal
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _own_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty (its stdin), so that ^C typed there
    sends SIGINT to the chat, as in a shell."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`lmforge chat` running on a pseudo-terminal: its stdin, stdout and stderr are a real tty."""

    def __init__(self, args: list[str]):
        self.fd, slave = pty.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")  # dumb: readline writes no escape codes
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, cwd=ROOT, env=env, close_fds=True, preexec_fn=_own_terminal)
        os.close(slave)
        self.seen = ""

    def read(self, timeout: float = 1.0) -> None:
        """Add what the program wrote within ``timeout`` seconds to ``seen`` (newlines as \\n)."""
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            self.seen += ANSI.sub("", data.decode("utf-8", "replace").replace("\r\n", "\n"))

    def until_prompt(self, timeout: float = 180) -> str:
        """Everything written up to the next input prompt (newlines as \\n), the prompt excluded."""
        deadline = time.monotonic() + timeout
        while not self.seen.endswith("\n" + PROMPT):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"no prompt; the terminal shows:\n{self.seen}"
            self.read(min(left, 1.0))
        block, self.seen = self.seen[: -len(PROMPT)], ""
        return block

    def say(self, line: str) -> str:
        """Type ``line`` and Enter; what the program wrote after the echoed line, up to the next prompt."""
        os.write(self.fd, line.encode() + b"\n")
        block = self.until_prompt()
        assert block.startswith(line + "\n"), block  # the terminal echoes what was typed
        return block[len(line) + 1:]

    def close(self) -> int:
        """/exit, and the exit code; a chat that does not exit within a minute is killed (never left running)."""
        try:
            os.write(self.fd, b"/exit\n")
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.fd)


def test_chat_in_a_terminal_keeps_history_resets_and_sets_the_system_prompt(sharp_model_dir, reference):
    term = Terminal(["--model", str(sharp_model_dir), "--temperature", "0", "--max-new-tokens", "12",
                     "--dtype", "float32"])
    try:
        banner = term.until_prompt()
        assert "/system" in banner and "/reset" in banner and "/exit" in banner
        u1, u2, system = "the quick brown fox", "seven wizards judge boxing matches", "extract json"

        a1 = term.say(u1).removesuffix("\n")
        assert a1 == reference([_user(u1)])
        a2 = term.say(u2).removesuffix("\n")
        assert a2 == reference([_user(u1), _assistant(a1), _user(u2)])  # turn 2 is given turn 1
        alone = reference([_user(u2)])
        assert a2 != alone  # so the line above would fail if the history were dropped

        assert "conversation cleared" in term.say("/reset")
        assert term.say(u2).removesuffix("\n") == alone  # nothing of the first two turns is left

        assert "system prompt set" in term.say(f"/system {system}")
        a4 = term.say(u2).removesuffix("\n")
        assert a4 == reference([{"role": "system", "content": system}, _user(u2), _assistant(alone), _user(u2)])
        assert a4 != reference([_user(u2), _assistant(alone), _user(u2)])  # the system message changed it
    finally:
        code = term.close()
        term.proc.kill()  # no-op when it has exited
    assert code == 0


def test_end_of_input_quits_with_exit_code_0(sharp_model_dir):
    """Ctrl-D at the prompt (end of input on a terminal) ends the session like /exit."""
    term = Terminal(["--model", str(sharp_model_dir), "--temperature", "0", "--dtype", "float32"])
    term.until_prompt()
    os.write(term.fd, b"\x04")  # the terminal's EOF character
    assert term.proc.wait(timeout=60) == 0
    os.close(term.fd)


@pytest.fixture(scope="module")
def long_context_model_dir(sharp_model_dir, tmp_path_factory):
    """The sharp tiny model made to talk on: room for 16k positions, and an EOS logit of 0 (its output weights
    zeroed) under a positive maximum (the largest of ~400 random logits), so greedy answers never end early and
    one is still being written whenever ^C comes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sharp_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    model.config.max_position_embeddings = 16384
    out = tmp_path_factory.mktemp("long-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_ctrl_c_in_the_terminal_stops_the_answer(long_context_model_dir):
    term = Terminal(["--model", str(long_context_model_dir), "--temperature", "0", "--max-new-tokens", "16000",
                     "--dtype", "float32"])

    def interrupt(line: str) -> str:
        """Type ``line``, wait until 20 characters of the answer have streamed, press ^C; what was shown."""
        os.write(term.fd, line.encode() + b"\n")
        deadline = time.monotonic() + 60
        while len(term.seen) < len(line) + 1 + 20:
            assert time.monotonic() < deadline and term.proc.poll() is None, f"no answer streams:\n{term.seen}"
            term.read()
        os.write(term.fd, b"\x03")  # ^C: the terminal sends SIGINT to the chat
        return term.until_prompt(timeout=60)

    try:
        term.until_prompt()
        assert interrupt("the quick brown fox").endswith("\n[answer stopped]\n")  # 16,000 tokens never came
        # the stopped answer left the engine (one sequence at a time): the next one streams at once
        assert interrupt("alpha beta").endswith("\n[answer stopped]\n")
    finally:
        code = term.close()
        term.proc.kill()
    assert code == 0


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_a_clear_error(tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--backend", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--backend vllm: the vllm package is not installed" in err and "pip install vllm" in err
    assert "Traceback" not in err


def test_bad_model_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model' is not a local model directory" in err and "Traceback" not in err

    # a model whose tokenizer has no chat template cannot hold a conversation
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "chat_template.jinja":
            (plain / f.name).write_bytes(f.read_bytes())
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["chat", "--model", str(plain)]) == 2
    err = capsys.readouterr().err
    assert "--model: the tokenizer has no chat template" in err and "Traceback" not in err


def test_bad_sampling_options_are_refused(tiny_model_dir, capsys):
    assert main(["chat", "--model", str(tiny_model_dir), "--top-p", "0"]) == 2
    assert "--top-p: must be in (0, 1]" in capsys.readouterr().err
