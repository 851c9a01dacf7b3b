"""Data the project generates itself (no third-party text): a record -> JSON extraction task.

Each row describes a person in one of several sentence shapes; the answer is a compact JSON object.
The base SmolLM2-135M-Instruct answers such prompts with prose or code, so a short LoRA run shows a
visible before/after. Preference pairs use a corrupted JSON (wrong field, missing key, prose) as rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FIRST = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena",
         "Mateo", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wen", "Yara", "Zane"]
LAST = ["Adler", "Bauer", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat", "Ito", "Jensen", "Kowalski",
        "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka", "Varga", "Weber", "Young"]
CITIES = ["Lyon", "Porto", "Oslo", "Kyoto", "Lagos", "Quito", "Graz", "Turku", "Cork", "Pune", "Perth", "Bergen",
          "Malmo", "Split", "Leeds", "Basel", "Ghent", "Brno", "Bilbao", "Tartu"]
JOBS = ["baker", "nurse", "pilot", "teacher", "plumber", "chemist", "architect", "farmer", "librarian", "welder",
        "dentist", "editor", "carpenter", "florist", "surveyor", "tailor"]
SHAPES = [
    "{name} is a {age}-year-old {job} from {city}.",
    "Meet {name}, {age}, who works as a {job} in {city}.",
    "{city} is home to {name}, a {job} aged {age}.",
    "Our {job}, {name}, turned {age} this year and lives in {city}.",
    "Record: {name} / age {age} / {job} / based in {city}.",
]
INSTRUCTION = "Extract name, age, city and job from the text as compact JSON with keys name, age, city, job."


def _person(rng: random.Random) -> dict:
    return {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 79),
            "city": rng.choice(CITIES), "job": rng.choice(JOBS)}


def answer(p: dict) -> str:
    return json.dumps({"name": p["name"], "age": p["age"], "city": p["city"], "job": p["job"]}, separators=(",", ":"))


def _corrupt(p: dict, rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        q = dict(p, city=rng.choice([c for c in CITIES if c != p["city"]]))
        return answer(q)
    if kind == 1:
        return json.dumps({"name": p["name"], "age": p["age"]}, separators=(",", ":"))
    return f"The person is {p['name']} and they are a {p['job']}."


def extraction_rows(n: int, seed: int) -> list[dict]:
    """Chat rows: user gives the instruction and a text, assistant answers with the JSON."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = _person(rng)
        text = rng.choice(SHAPES).format(**p)
        rows.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\nText: {text}"},
                                  {"role": "assistant", "content": answer(p)}]})
    return rows


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = _person(rng)
        text = rng.choice(SHAPES).format(**p)
        rows.append({"prompt": [{"role": "user", "content": f"{INSTRUCTION}\nText: {text}"}],
                     "chosen": [{"role": "assistant", "content": answer(p)}],
                     "rejected": [{"role": "assistant", "content": _corrupt(p, rng)}]})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_extraction_dataset(directory: str | Path, n_train: int = 400, n_val: int = 32, seed: int = 0) -> Path:
    """train.jsonl / val.jsonl in a directory (the train/val layout lmforge reads)."""
    d = Path(directory)
    write_jsonl(extraction_rows(n_train, seed), d / "train.jsonl")
    write_jsonl(extraction_rows(n_val, seed + 1), d / "val.jsonl")
    return d
