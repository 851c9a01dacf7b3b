"""Row formats: detection from the keys, validation with a reason per bad row, normalisation.

Every accepted row becomes one canonical dict:
  text              {"text": str}
  prompt_completion {"prompt": str, "completion": str}
  chat              {"messages": [{"role": str, "content": str}, ...]}
  preference        {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
                    (+ "margin": float when the row has one; method reward reads it)
  kto               {"prompt": str | messages, "completion": str | messages, "label": bool}
  prompts           {"prompt": str | messages, "columns": {every other key of the row}}   (online RL: the
                    completions are sampled while training; the columns go to the reward functions)
"""

from __future__ import annotations

from typing import Any, Iterable

from lmforge.config import DataSource
from lmforge.data.sources import BadRow, Row
from lmforge.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}
# prompt/completion key pairs, most specific first
PC_ALIASES = (("prompt", "completion"), ("prompt", "generation"), ("input", "output"), ("input", "target"))


class RowError(ValueError):
    """A row that does not fit its format; the message is the reason shown to the user."""


def detect_format(keys: set[str]) -> str | None:
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if "label" in keys and "completion" in keys:
        return "kto"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "prompt_completion"
    if any({p, c} <= keys for p, c in PC_ALIASES):
        return "prompt_completion"
    if "text" in keys or {"title", "content"} <= keys:
        return "text"
    if "prompt" in keys:  # a prompt and no answer: online RL's rows (method grpo)
        return "prompts"
    return None


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing key {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"{key!r} is empty")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RowError(f"{key}[{i}] must be an object with role and content")
        if "from" in msg and "role" not in msg:  # ShareGPT
            role = SHAREGPT_ROLES.get(msg.get("from"))
            if role is None:
                raise RowError(f"{key}[{i}]: unknown role {msg.get('from')!r} (expected one of {sorted(SHAREGPT_ROLES)})")
            content = msg.get("value")
        else:
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise RowError(f"{key}[{i}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise RowError(f"{key}[{i}]: content must be a string")
        if not content.strip() and role == "assistant":
            raise RowError(f"{key}[{i}]: empty assistant message")
        out.append({"role": role, "content": content})
    return out


def _template(template: str | None, placeholder: str, value: str) -> str:
    return template.replace(placeholder, value) if template else value


def normalize(row: Any, fmt: str, src: DataSource) -> dict:
    """Validate one raw row against ``fmt`` and return its canonical form; raise RowError with the reason."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "text":
        if "text" in row:
            return {"text": _text(row, "text")}
        return {"text": _text(row, "title") + "\n\n" + _text(row, "content")}
    if fmt == "prompt_completion":
        if "instruction" in row:  # alpaca
            prompt = _text(row, "instruction")
            extra = row.get("input")
            if extra is not None and not isinstance(extra, str):
                raise RowError("'input' must be a string")
            if extra and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            completion = _text(row, "output")
        else:
            pk, ck = next(((p, c) for p, c in PC_ALIASES if p in row and c in row), PC_ALIASES[0])
            prompt, completion = _text(row, pk), _text(row, ck)
        return {"prompt": _template(src.input_format, "__input__", prompt),
                "completion": _template(src.output_format, "__output__", completion)}
    if fmt == "chat":
        key = "messages" if "messages" in row else "conversations"
        if key not in row:
            raise RowError("missing key 'messages'")
        messages = _messages(row[key], key)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError(f"{key!r} has no assistant turn to learn from")
        return {"messages": messages}
    if fmt == "preference":
        out = {}
        for key in ("prompt", "chosen", "rejected"):
            if key not in row or row[key] is None:
                raise RowError(f"missing key {key!r}" + (" (a preference row needs both sides)" if key != "prompt" else ""))
            value = row[key]
            out[key] = _messages(value, key) if isinstance(value, list) else _text(row, key)
        if row.get("margin") is not None:  # method reward: how much better chosen is (TRL's margin column)
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
                raise RowError(f"'margin' must be a number, got {margin!r}")
            out["margin"] = float(margin)
        return out
    if fmt == "kto":
        out = {}
        for key in ("prompt", "completion"):
            if key not in row:
                raise RowError(f"missing key {key!r}")
            value = row[key]
            out[key] = _messages(value, key) if isinstance(value, list) else _text(row, key)
        if not isinstance(row.get("label"), bool):
            raise RowError("'label' must be true or false")
        out["label"] = row["label"]
        return out
    if fmt == "prompts":
        if "prompt" not in row or row["prompt"] is None:
            raise RowError("missing key 'prompt'")
        value = row["prompt"]
        prompt = _messages(value, "prompt") if isinstance(value, list) else _text(row, "prompt")
        return {"prompt": prompt, "columns": {k: v for k, v in row.items() if k != "prompt"}}
    raise DataError(f"unknown format {fmt!r}")


def source_format(src: DataSource, rows: Iterable[Row | BadRow]) -> str:
    """The format of a source: ``format:`` when set (``rows`` is not read), else detected from the keys of its first
    object row (``rows``, the source's rows in order, is read up to it). The error names that row, or the source
    when it has none."""
    if src.format != "auto":
        return src.format
    first = next((r for r in rows if isinstance(r, Row) and isinstance(r.data, dict)), None)
    fmt = detect_format(set(first.data)) if first else None
    if fmt is None:
        where, keys = (first.origin, sorted(first.data)) if first else (src.path or src.loader, [])
        raise DataError(
            f"{where}: cannot tell the data format from the keys {keys}; expected text, prompt/completion, "
            "messages, or prompt/chosen/rejected (or set format: on the source)"
        )
    return fmt


def check_row(row: Row | BadRow, fmt: str, src: DataSource, index: int = 0) -> Row | BadRow:
    """A row of a source in ``fmt``, normalised (``source`` set to ``index``); or a BadRow with the reason. A row that
    could not even be parsed (sources.py) is a BadRow already."""
    if isinstance(row, BadRow):
        return row
    try:
        return Row(normalize(row.data, fmt, src), row.origin, index)
    except RowError as e:
        return BadRow(row.origin, str(e))


def normalize_rows(rows: list[Row], src: DataSource) -> tuple[str, list[Row], list[BadRow]]:
    """Detect the source's format (unless forced) and normalise every row; bad rows carry a reason."""
    fmt = source_format(src, rows)
    checked = [check_row(r, fmt, src) for r in rows]
    return fmt, [r for r in checked if isinstance(r, Row)], [r for r in checked if isinstance(r, BadRow)]
