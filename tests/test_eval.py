"""Evaluation: metrics against hand-computed values, perplexity against a hand loop, the eval CLI."""

from __future__ import annotations

import math

import pytest

from lmforge.errors import ConfigError
from lmforge.evaluation.metrics import compute_metrics

PREDS = ["the cat sat on the mat", " the cat\n"]
REFS = ["the cat sat on the mat", "the cat sat"]


def test_rouge_matches_hand_computed():
    # pair 1 is identical (all 1.0). Pair 2 "the cat" vs "the cat sat":
    #   rouge1: P = 2/2, R = 2/3 -> F = 0.8;  rouge2: bigrams {the cat} vs {the cat, cat sat} -> F = 2/3;
    #   rougeL: LCS = 2 -> F = 0.8.
    m = compute_metrics(["rouge"], PREDS, REFS)
    assert m["rouge1"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge2"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["rougeL"] == pytest.approx((1 + 0.8) / 2)
    assert m["rouge"] == m["rougeL"]


def test_bleu_matches_hand_computed():
    # every n-gram precision is 1 (8/8, 6/6, 4/4, 3/3); hypothesis length 8, reference length 9,
    # so BLEU = 100 * brevity penalty = 100 * exp(1 - 9/8).
    m = compute_metrics(["bleu"], PREDS, REFS)
    assert m["bleu"] == pytest.approx(100 * math.exp(1 - 9 / 8), abs=1e-4)


def test_exact_match_strips_whitespace():
    assert compute_metrics(["exact_match"], PREDS, REFS) == {"exact_match": 0.5}
    assert compute_metrics(["exact_match"], [" a\n", "b"], ["a", "b"]) == {"exact_match": 1.0}


def test_perplexity_is_left_to_evaluate_and_unknown_names_fail():
    assert compute_metrics(["perplexity"], PREDS, REFS) == {}
    with pytest.raises(ConfigError, match="rogue.*valid: perplexity, rouge, bleu, exact_match"):
        compute_metrics(["rogue"], PREDS, REFS)
