"""What ``lmforge estimate`` reads, before anything heavy loads: the model's shape, its trainable parameters, the
training data's length distribution, and this machine (RAM available, matmul peak). ``estimate.py`` does the
arithmetic on them.

What it reads: the config, the model's config (``config.json``; for a ``.gguf`` file or the built-in alias its
GGUF metadata, the weights neither read nor dequantised; for ``model.config`` the given keys), the tokenizer,
and a sample of the training rows run through lmforge's own data layer (``data/prepare.py``: read, tokenise,
mask, truncate, pack), or the prepared data's cache, or the first rows of a stream. The model is built on the
``meta`` device (shapes only, no storage), so parameter counts, the LoRA inventory (which modules
``peft.target_modules`` hits, their in/out features) and the decoder layers are exactly the model's.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge import models
from lmforge.config import Config
from lmforge.data.packing import pack_bins
from lmforge.data.preference import encode_preference_rows
from lmforge.data.prompts import encode_prompt_rows
from lmforge.data.prepare import Stats, cache_dir, encode_rows, fingerprint, load_rows, split_rows
from lmforge.data.streaming import PackedStream
from lmforge.data.tokenize import IGNORE
from lmforge.errors import ConfigError, DataError, UnsupportedError
from lmforge.plan import CAUSAL, PAIRS, PROMPTS
from lmforge.training import flops
from lmforge.training.sharding import decoder_layers

SAMPLE_ROWS = 2000  # training rows tokenised to learn the length distribution (all of them when fewer)


# ============================================================================================ the model
@dataclass
class ModelShape:
    """What the estimate knows about the model: counts from its config, built on the meta device."""

    source: str  # where the config came from
    model_type: str
    architecture: str  # decoder | encoder-decoder | encoder-only (models.architecture's rule)
    params: dict[str, int]  # parameter name -> numel (tied weights once)
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features), the output layer included
    embeddings: dict[str, tuple[int, int]]  # module name -> (num_embeddings, embedding_dim)
    output_layer: str | None  # the LM head's module name (PEFT's all-linear skips it)
    tied: bool
    layers: int
    layer_params: int  # parameters of one decoder layer
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def total(self) -> int:
        return sum(self.params.values())

    def linear_weights(self, include_head: bool) -> int:
        """Weights of the linear layers (what runs as a matmul per position), with or without the LM head."""
        return sum(i * o for n, (i, o) in self.linears.items() if include_head or n != self.output_layer)


def architecture_of(config) -> str:
    """models.architecture's rule, on a config already read (models.architecture would import a GGUF file)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder-only"
    return "decoder"


def _imported_gguf(gguf: Path) -> Path | None:
    """The import cache entry of a GGUF file, if ``models.import_gguf`` made one."""
    try:
        entry = models.gguf_entry(gguf, remember=False)  # estimate writes nothing
    except OSError:
        return None
    return entry if (entry / models.IMPORTED).exists() else None


def _gguf_file(name_or_path: str) -> Path | None:
    if name_or_path in models.ALIASES:
        return models._alias_file(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {name_or_path} does not exist")
        return path
    return None


def read_model_config(cfg: Config):
    """(transformers config, tokenizer, adapter_config dict or None, source description), no weights read.

    A GGUF file (or the alias) gives its config and tokenizer from its metadata; if ``import_gguf`` already made a
    safetensors copy, that directory's config.json and tokenizer are read instead (same content, faster)."""
    from transformers import AutoConfig, AutoTokenizer

    m = cfg.model
    adapter = None
    name = m.name_or_path
    if name is not None and not _gguf_file(name) and models.is_adapter_dir(models.resolve_model_path(name)):
        adapter_dir = models.resolve_model_path(name)
        adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
        name = models.adapter_base(adapter_dir)
    if name is None:
        return None, None, None, "model.config"
    gguf = _gguf_file(name)
    if gguf is not None and _imported_gguf(gguf) is None:
        try:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # metadata only
        except Exception as e:  # noqa: BLE001 - the gguf reader raises many kinds
            raise ConfigError(f"model.name_or_path: cannot read the GGUF metadata of {gguf} ({e})") from None
        tok = models.load_tokenizer(m, None) if m.tokenizer else models.finalize_tokenizer(
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        return config, tok, adapter, f"{name} (GGUF metadata; weights not read)"
    model_dir = _imported_gguf(gguf) if gguf is not None else models.resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot read {model_dir}/config.json ({e})") from None
    return config, models.load_tokenizer(m, model_dir), adapter, f"{name} (config.json; weights not read)"


def model_shape(config, architecture: str, source: str, vocab_at_least: int = 0,
                trust_remote_code: bool = False) -> ModelShape:
    """Build the model on the meta device (no storage) and take its inventory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM
    from transformers.pytorch_utils import Conv1D

    config = copy.deepcopy(config)
    if vocab_at_least > getattr(config, "vocab_size", 0):  # load_model resizes the embeddings to the tokenizer
        config.vocab_size = vocab_at_least
    auto = {"decoder": AutoModelForCausalLM, "encoder-decoder": AutoModelForSeq2SeqLM,
            "encoder-only": AutoModelForMaskedLM}[architecture]
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    params = {n: p.numel() for n, p in model.named_parameters()}  # tied parameters appear once
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears, embeddings, output_layer = {}, {}, None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, Conv1D):  # GPT-2 style: weight (in, out)
            linears[name] = tuple(mod.weight.shape)
        elif isinstance(mod, torch.nn.Embedding):
            embeddings[name] = (mod.num_embeddings, mod.embedding_dim)
        if head is not None and mod is head:
            output_layer = name
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    try:
        blocks = decoder_layers(model)
    except UnsupportedError:  # a model that names no decoder layer class
        blocks = []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "d_model", None) or getattr(text, "n_embd", 0)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "num_heads", None) or getattr(text, "n_head", 1)
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // max(heads, 1)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "d_ff", None) or getattr(text, "n_inner", None) \
        or 4 * hidden
    return ModelShape(
        source=source, model_type=config.model_type, architecture=architecture, params=params, linears=linears,
        embeddings=embeddings, output_layer=output_layer, tied=tied, layers=len(blocks),
        layer_params=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0, hidden=hidden,
        intermediate=inter, heads=heads, kv_heads=kv, head_dim=head_dim, vocab=config.vocab_size,
    )


# ============================================================================================ adapters
@dataclass
class Trainable:
    kind: str  # none | lora | dora | qlora | prompt_tuning
    params: int  # trainable parameters
    modules: int  # modules given adapters (LoRA/DoRA/QLoRA)
    module_names: list[str]  # their distinct short names (q_proj, ...)
    quantised: int  # frozen parameters held in 4/8 bits (QLoRA)
    describe: str


def peft_targets(shape: ModelShape, target) -> list[str]:
    """The module names PEFT gives adapters for ``target_modules`` (peft.tuners.tuners_utils'
    ``check_target_module_exists``: a list matches a name or a dotted suffix; a string is a full-match regex;
    ``all-linear`` is every linear layer but the output layer)."""
    candidates = list(shape.linears) + list(shape.embeddings)
    if target == "all-linear":
        return [n for n in shape.linears if n != shape.output_layer]
    if isinstance(target, str):
        return [n for n in candidates if re.fullmatch(target, n)]
    return [n for n in candidates if any(n == t or n.endswith(f".{t}") for t in target)]


def trainable(shape: ModelShape, cfg: Config, adapter: dict | None = None) -> Trainable:
    """Trainable parameters for ``peft`` (or a continued adapter's adapter_config.json), counted from shapes:
    LoRA adds r x (in + out) per targeted linear (r x (num_embeddings + dim) per embedding), DoRA also a magnitude
    vector of ``out``, prompt tuning num_virtual_tokens x hidden; a full fine-tune trains everything, or the
    parameters matching ``train.trainable``."""
    peft = cfg.peft
    kind, r, target, virtual = peft.kind, peft.r, peft.target_modules, peft.num_virtual_tokens
    to_save = peft.modules_to_save or []
    if adapter is not None:  # continuing an adapter: its own config decides
        ptype = adapter.get("peft_type", "LORA")
        kind = "prompt_tuning" if ptype == "PROMPT_TUNING" else ("dora" if adapter.get("use_dora") else "lora")
        r, target = adapter.get("r", r), adapter.get("target_modules", target)
        virtual = adapter.get("num_virtual_tokens", virtual)
        to_save = adapter.get("modules_to_save") or []
        if isinstance(target, list) and len(target) == 1 and target[0] == "all-linear":
            target = "all-linear"
    if kind == "none":
        if cfg.train.trainable:
            n = sum(v for name, v in shape.params.items()
                    if any(fnmatch.fnmatch(name, pat) for pat in cfg.train.trainable))
            return Trainable(kind, n, 0, [], 0, f"full fine-tune of the parameters matching {cfg.train.trainable}")
        return Trainable(kind, shape.total, 0, [], 0, "full fine-tune")
    if kind == "prompt_tuning":
        n = virtual * shape.hidden
        return Trainable(kind, n, 0, [], 0, f"prompt tuning, {virtual} virtual tokens x hidden {shape.hidden}")
    names = peft_targets(shape, target)
    if not names:
        raise ConfigError(f"peft.target_modules: {target!r} matches no module of this {shape.model_type} model")
    n = 0
    for name in names:
        if name in shape.linears:
            fan_in, fan_out = shape.linears[name]
        else:
            fan_in, fan_out = shape.embeddings[name]
        n += r * (fan_in + fan_out) + (fan_out if kind == "dora" else 0)
    saved = sum(v for pname, v in shape.params.items() if any(f".{m}." in f".{pname}" for m in to_save))
    quantised = 0
    if kind == "qlora":  # bitsandbytes quantises every linear weight but the LM head (transformers skips it)
        quantised = shape.linear_weights(include_head=False)
    short = sorted({x.rsplit(".", 1)[-1] for x in names})
    label = {"lora": "LoRA", "dora": "DoRA", "qlora": f"QLoRA ({peft.bits}-bit base)"}[kind]
    what = f"{label} r={r} on {len(names)} modules ({', '.join(short)})" + (f", + {to_save} in full" if saved else "")
    return Trainable(kind, n + saved, len(names), short, quantised, what)


# ============================================================================================ the data
@dataclass
class DataShape:
    """The training rows, as the engine will batch them (packed rows or samples), from a sample of the data."""

    rows_read: int  # training rows after mixing (data.num_samples or every row)
    sampled: int  # of them tokenised here
    rows: int  # training rows of the prepared dataset (packed rows, or samples), extrapolated from the sample
    tokens: int  # non-padding tokens in the prepared dataset (extrapolated)
    loss_fraction: float
    packed: bool
    row_lengths: list[int]  # of the sample's training rows
    row_loss: list[int]  # loss tokens per sample row
    row_attention: list[int]  # per row: the sum of squared attention spans (sample lengths when packed)
    max_length: int
    truncated: int = 0
    dropped: int = 0
    prepared: str | None = None  # the prepared data's cache directory, when the counts came from there
    streamed: bool = False  # data.streaming: rows taken from the stream; no totals (rows, tokens are 0)

    @property
    def mean_row(self) -> float:
        return sum(self.row_lengths) / max(len(self.row_lengths), 1)


def _sample_texts(per_source) -> list[str]:
    out = []
    for _, rows in per_source:
        for r in rows:
            for v in r.data.values():
                if isinstance(v, str):
                    out.append(v)
                elif isinstance(v, list):
                    out += [m["content"] for m in v if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return out


def sample_tokenizer(cfg: Config):
    """``model.train_tokenizer``: a tokenizer trained on a sample of the rows here (a temporary one; train trains
    its own)."""
    import tempfile

    tt = cfg.model.train_tokenizer
    per_source, _, _ = load_rows(cfg, "train")
    rng = random.Random(cfg.train.seed)
    per_source = [(fmt, rows if len(rows) <= SAMPLE_ROWS else rng.sample(rows, SAMPLE_ROWS))
                  for fmt, rows in per_source]
    with tempfile.TemporaryDirectory() as d:
        return models.finalize_tokenizer(models.train_bpe_tokenizer(
            _sample_texts(per_source), tt.vocab_size, tt.min_frequency, Path(d), models.architecture(cfg)))


def sample_data(cfg: Config, tokenizer, packed: bool, layout: str, sample_rows: int = SAMPLE_ROWS) -> DataShape:
    """Read every training row (validated as ``prepare`` does: bad rows stop here too), tokenise a seeded sample
    of them through the data layer, pack the sample, and scale its counts to the whole data."""
    import numpy as np

    if getattr(cfg.data, "streaming", False):
        return _from_stream(cfg, tokenizer, packed)
    if layout == CAUSAL:  # ``lmforge prepare`` (or an earlier run) cached this data: its exact counts
        target = cache_dir(cfg) / fingerprint(cfg, tokenizer, "train", packed, layout)
        if (target / "stats.json").exists():
            return _from_prepared(target, cfg, packed, sample_rows)
    per_source, _, _ = load_rows(cfg, "train")
    rows = split_rows(cfg, "train", per_source)
    sample = rows if len(rows) <= sample_rows else random.Random(cfg.train.seed).sample(rows, sample_rows)
    stats = Stats()
    if layout == PAIRS:
        records = encode_preference_rows(cfg, tokenizer, sample, stats)
        lengths, loss, attention = [], [], []
        for rec in records:
            answers = [rec[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in rec]
            p = len(rec["prompt_ids"])
            lengths.append(p + sum(len(a) for a in answers))  # the native engine's shared-prompt row
            loss.append(sum(len(a) for a in answers))
            attention.append(sum((p + len(a)) ** 2 for a in answers))
        packed = False
    elif layout == PROMPTS:  # online RL: each prompt trains num_generations completions, at most this long each
        G, L = cfg.grpo.num_generations, cfg.grpo.max_completion_length
        lengths, loss, attention = [], [], []
        for rec in encode_prompt_rows(cfg, tokenizer, sample, stats):
            n = len(rec["prompt_ids"]) + L
            lengths.append(G * n)
            loss.append(G * L)
            attention.append(G * n * n)
        packed = False
    else:
        tokens = encode_rows(cfg, tokenizer, sample, stats)
        lens = tokens.lengths
        starts = tokens.starts
        carries = (tokens.labels != IGNORE).astype(np.int64)
        per_sample_loss = np.add.reduceat(carries, starts) if len(lens) else np.zeros(0, np.int64)
        if packed:
            bins = pack_bins(lens, cfg.data.max_length, cfg.train.seed)
            lengths = [int(sum(lens[i] for i in b)) for b in bins]
            loss = [int(sum(per_sample_loss[i] for i in b)) for b in bins]
            attention = [int(sum(int(lens[i]) ** 2 for i in b)) for b in bins]
        else:
            lengths, loss = lens.tolist(), per_sample_loss.tolist()
            attention = [n * n for n in lengths]
    if not lengths:
        raise DataError(f"no training samples left after tokenisation ({stats.dropped or 'all rows were bad'})")
    scale = len(rows) / max(len(sample), 1)
    tokens_total = int(round(sum(lengths) * scale))
    if len(sample) == len(rows):
        n_rows = len(lengths)
    elif packed:  # more samples fill bins at least as well: rows from the whole data's tokens and the sample's fill
        n_rows = math.ceil(tokens_total / (sum(lengths) / len(lengths)))
    else:
        n_rows = int(round(len(lengths) * scale))
    return DataShape(rows_read=len(rows), sampled=len(sample), rows=n_rows, tokens=tokens_total,
                     loss_fraction=sum(loss) / max(sum(lengths), 1), packed=packed, row_lengths=lengths,
                     row_loss=loss, row_attention=attention, max_length=cfg.data.max_length,
                     truncated=int(round(stats.truncated * scale)),
                     dropped=int(round(sum(stats.dropped.values()) * scale)))


STREAM_ROWS = 64  # data.streaming: training rows taken from the stream to learn their lengths (at least 4 batches)


def _from_stream(cfg: Config, tokenizer, packed: bool) -> DataShape:
    """``data.streaming``: the first rows of the stream itself (``data/streaming.py``, the same reading, mixing,
    shuffle buffer and packing as training); a stream has no size, so no row or token total (steps are
    ``train.max_steps``, which streaming requires)."""
    stream = PackedStream(cfg, tokenizer, packed)
    rows = stream.take(max(STREAM_ROWS, 4 * cfg.train.per_device_train_batch_size))
    with stream.cond:  # its reader thread (a daemon) reads no further: it waits for room that never comes
        stream.ahead = 0
    lengths = [len(r["input_ids"]) for r in rows]
    loss = [sum(1 for x in r["labels"] if x != IGNORE) for r in rows]
    spans = [r.get("seq_lens") or [len(r["input_ids"])] for r in rows]
    return DataShape(rows_read=stream.counts["rows"], sampled=len(rows), rows=0, tokens=0,
                     loss_fraction=sum(loss) / max(sum(lengths), 1), packed=packed, row_lengths=lengths,
                     row_loss=loss, row_attention=[sum(n * n for n in sp) for sp in spans],
                     max_length=cfg.data.max_length, streamed=True)


def _from_prepared(target: Path, cfg: Config, packed: bool, sample_rows: int) -> DataShape:
    """The DataShape of a prepared (cached) split: exact totals, row statistics from a seeded sample of its rows."""
    import numpy as np
    import pyarrow.compute as pc
    from datasets import load_from_disk

    stats = json.loads((target / "stats.json").read_text())
    table = load_from_disk(str(target / "data")).data.table  # memory-mapped Arrow
    n = table.num_rows
    keep = sorted(random.Random(cfg.train.seed).sample(range(n), min(n, 10 * sample_rows)))
    table = table.take(keep)

    def per_row(column: str, values: np.ndarray) -> np.ndarray:
        col = table.column(column).combine_chunks()
        return np.bincount(np.asarray(pc.list_parent_indices(col)), weights=values, minlength=len(keep))

    labels = np.asarray(pc.list_flatten(table.column("labels").combine_chunks()))
    seq_lens = np.asarray(pc.list_flatten(table.column("seq_lens").combine_chunks())).astype(np.float64)
    lengths = np.asarray(pc.list_value_length(table.column("input_ids").combine_chunks()))
    loss = per_row("labels", (labels != IGNORE).astype(np.float64))
    attention = per_row("seq_lens", seq_lens ** 2)
    return DataShape(rows_read=stats["rows"] - stats.get("bad_rows", 0), sampled=len(keep), rows=n,
                     tokens=stats["tokens"], loss_fraction=stats["loss_tokens"] / max(stats["tokens"], 1),
                     packed=packed, row_lengths=[int(x) for x in lengths], row_loss=[int(x) for x in loss],
                     row_attention=[int(x) for x in attention], max_length=cfg.data.max_length,
                     truncated=stats.get("truncated", 0), dropped=sum(stats.get("dropped", {}).values()),
                     prepared=str(target))


# ============================================================================================ the machine
@dataclass
class Machine:
    cpu: str
    available: int  # bytes of RAM available now
    gpu_memory: int | None  # bytes per GPU, None without one
    peak_flops: float  # matmul FLOP/s of the compute dtype (flops.peak_flops)
    threads: int = 0  # torch threads the peak and the probe are measured at (0: this process's)
    probe: bool = False  # the speed may be measured here (estimate_probe.py): a CPU, this machine


def this_machine(compute, threads: int | None = None, model_config=None) -> Machine:
    """RAM available now, the GPU's memory, and the matmul peak of ``compute`` (measured at ``threads`` torch
    threads when given: see ``estimate_report.log_at_start``; at ``model_config``'s linear shapes when given, as the
    engines' ``mfu`` is: ``flops.peak_flops``)."""
    import torch

    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:
        available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                         if line.startswith("MemAvailable"))
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    threads = threads or torch.get_num_threads()
    # no probe on a GPU machine: it measures the CPU (the GPU keeps the fitted efficiencies, docs/estimate.md)
    return Machine(flops.cpu_kind(), available, gpu, flops.peak_flops(compute, threads, model_config), threads,
                   gpu is None)
