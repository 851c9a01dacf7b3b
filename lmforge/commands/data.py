"""`lmforge prepare CONFIG` and `lmforge inspect CONFIG`: what the training data becomes before training."""

from __future__ import annotations

import sys

from lmforge.config import load_config


def add_parser(sub, formatter):
    p = sub.add_parser("prepare", help="validate, tokenise, mask, pack and cache the data; print counts",
                       formatter_class=formatter)
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    q = sub.add_parser("inspect", help="print processed samples with the loss-carrying tokens marked",
                       formatter_class=formatter)
    q.add_argument("config", help="YAML config file")
    q.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    q.add_argument("--n", type=int, default=3, help="how many samples to show")
    q.add_argument("--split", choices=["train", "eval"], default="train", help="which data to show")
    q.add_argument("--debug", action="store_true", help="show full tracebacks")
    q.set_defaults(_run=run_inspect)
    return p


def _tokenizer_and_plan(cfg):
    from lmforge import plan
    from lmforge.models import architecture, resolve_model_and_tokenizer

    _, _, tok = resolve_model_and_tokenizer(cfg)
    return tok, plan.plan(cfg, architecture(cfg))


def run(args) -> int:
    from lmforge.data.split import prepare_split

    cfg = load_config(args.config, args.overrides)
    tok, run_plan = _tokenizer_and_plan(cfg)
    packed, arch = run_plan.packing, run_plan.architecture
    for role in ("train", "eval"):
        if role == "train" and cfg.data.streaming:
            print("train: data.streaming: true: read, tokenised and packed while training (nothing cached); "
                  "`lmforge inspect` shows samples of the cached mode")
            continue
        ds, stats, path = prepare_split(cfg, tok, role, packed, arch)
        if ds is None:
            continue
        print(f"{role}: cached at {path}")
        for line in stats.lines():
            print(f"  {line}")
    return 0


def _marked(tok, ids, labels, color: bool) -> str:
    """Decode ids, wrapping runs of loss-carrying tokens in markers (green on a terminal, [[...]] otherwise)."""
    from lmforge.data.tokenize import IGNORE

    out, run, in_loss = [], [], None
    open_, close = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")

    def flush():
        if run:
            text = tok.decode(run, skip_special_tokens=False)
            out.append(f"{open_}{text}{close}" if in_loss else text)

    for i, l in zip(ids, labels):
        carries = l != IGNORE
        if carries != in_loss:
            flush()
            run, in_loss = [], carries
        run.append(i)
    flush()
    return "".join(out)


def run_inspect(args) -> int:
    from lmforge.data.split import prepare_split

    cfg = load_config(args.config, args.overrides)
    tok, run_plan = _tokenizer_and_plan(cfg)
    print("run plan:")
    for line in run_plan.lines():
        print(f"  {line}")
    packed, arch = run_plan.packing, run_plan.architecture
    ds, stats, _ = prepare_split(cfg, tok, args.split, packed, arch)
    if ds is None:
        print(f"no {args.split} data configured")
        return 0
    color = sys.stdout.isatty()
    legend = "green" if color else "[[ ]]"
    from lmforge.data.preference import show_records

    if run_plan.layout == "pairs":
        print(f"{len(ds)} {'records' if cfg.method == 'kto' else 'pairs'}; answer tokens (they carry the loss) "
              f"are marked {legend}")
        show_records(tok, ds, args.n, lambda ids, labels: _marked(tok, ids, labels, color))
        return 0
    if run_plan.layout == "prompts":  # online RL: the completions are sampled while training
        print(f"{len(ds)} prompts; completions are sampled during training, and the rewards see the other columns")
        for k in range(min(args.n, len(ds))):
            rec = ds[k]
            print(f"\n--- prompt {k} ({rec['origin']}): {len(rec['prompt_ids'])} tokens ---")
            print(tok.decode(rec["prompt_ids"], skip_special_tokens=False))
            print(f"columns: {rec['columns']}")
        return 0
    if stats.layout == "seq2seq":  # encoder input and decoder target are separate sequences
        print(f"{len(ds)} input/target pairs; the target tokens (the decoder's labels, all carry loss) are marked "
              f"{legend}")
        for k in range(min(args.n, len(ds))):
            ids, labels = ds[k]["input_ids"], ds[k]["labels"]
            print(f"\n--- sample {k}: input {len(ids)} tokens, target {len(labels)} tokens ---")
            print(f"input:  {tok.decode(ids, skip_special_tokens=False)}")
            print(f"target: {_marked(tok, labels, labels, color)}")
        return 0
    kind = "maskable" if stats.layout == "mlm" else "with loss"
    if stats.layout == "mlm":
        print(f"{len(ds)} text blocks; each step masks a random data.mlm_probability ({cfg.data.mlm_probability}) of "
              f"the tokens marked {legend}, and only those carry loss")
    else:
        print(f"{len(ds)} {'packed rows' if packed else 'samples'}; tokens that carry loss are marked {legend}")
    for k in range(min(args.n, len(ds))):
        row = ds[k]
        start = 0
        for j, n in enumerate(row["seq_lens"]):
            ids, labels = row["input_ids"][start:start + n], row["labels"][start:start + n]
            n_loss = sum(1 for x in labels if x != -100)
            print(f"\n--- row {k} sample {j}: {n} tokens, {n_loss} {kind} ---")
            print(_marked(tok, ids, labels, color))
            start += n
    return 0
