"""Generation metrics as pure functions: ROUGE (rouge-score), BLEU (sacrebleu), exact match.

Used by `lmforge eval` and by evaluation during training. Perplexity needs the model, so it lives in
evaluate.py; "perplexity" is accepted here as a known name and skipped.
"""

from __future__ import annotations

from lmforge.registry import GENERATION_METRICS, check_metric_names  # noqa: F401 (evaluate.py imports them here)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over pairs (0..1); `rouge` repeats rougeL, the usual headline number."""
    from rouge_score import rouge_scorer

    kinds = ["rouge1", "rouge2", "rougeL"]
    scorer = rouge_scorer.RougeScorer(kinds, use_stemmer=False)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # score(target, prediction)
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    out = {kind: totals[kind] / len(predictions) for kind in kinds}
    out["rouge"] = out["rougeL"]
    return out


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu corpus BLEU (0..100) with one reference per prediction and its default 13a tokenizer."""
    import sacrebleu

    return {"bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score)}


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Fraction (0..1) of predictions equal to their reference after stripping surrounding whitespace."""
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return {"exact_match": hits / len(predictions)}


_FUNCTIONS = {"rouge": rouge, "bleu": bleu, "exact_match": exact_match}


def compute_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Compute the named generation metrics; the model metrics (perplexity, reward_accuracy) are accepted and left
    to evaluate.py."""
    check_metric_names(names)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    wanted = [n for n in names if n in _FUNCTIONS]
    if wanted and not predictions:
        raise ValueError("no predictions to score")
    out: dict[str, float] = {}
    for name in wanted:
        out.update(_FUNCTIONS[name](predictions, references))
    return out
