"""Writes docs/config.md from the config schema (lmforge.config), so the reference never drifts.

    .venv/bin/python scripts/config_reference.py          # rewrite docs/config.md
    .venv/bin/python scripts/config_reference.py --check  # exit 1 if it is out of date (a test runs this)
"""

import sys
from pathlib import Path

from lmforge.config import iter_fields

OUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def render() -> str:
    lines = ["# Config reference", "", "Generated from `lmforge/config.py` by `scripts/config_reference.py`; "
             "every key is validated (unknown keys are errors with a suggestion). Override any key on the command "
             "line as `dotted.key=value`.", ""]
    section = None
    for key, tp, default, help in iter_fields():
        top = key.split(".")[0] if "." in key else "(top level)"
        if top != section:
            section = top
            lines += ["", f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        tp = tp.replace("|", "\\|")
        lines.append(f"| `{key}` | {tp} | `{default!r}` | {help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
