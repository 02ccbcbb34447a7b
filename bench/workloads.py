"""The work every runner does: workloads x datasets, their sizes, and their data files.

Workloads: ``sft-lora`` (LoRA r=8, alpha 16, dropout 0.05, all-linear: tunesmith's
defaults), ``sft-full`` (full fine-tuning), ``dpo-lora`` (DPO sigmoid, beta 0.1, LoRA as
above, reference = the adapter disabled).

Datasets:
- ``uniform``: synthetic single-turn chat records generated here, every one exactly
  ``row_tokens`` tokens long under the model's chat template (so no runner gains from
  padding or length grouping); for DPO, chosen and rejected rows are each that long.
- ``real``: the shared LLaMA-Factory demo sets, read through tunesmith's data layer
  (``load_records``): alpaca_en_demo.json (SFT) and dpo_en_demo.json (DPO). A fixed
  random sample (seed 0) of the records the run needs is written, canonical, to a temp
  folder; records whose trained tokens would all be cut at ``max_length`` are left out
  so every runner sees the same records.

Every runner gets the same records, batch size, max length, seed and LoRA config, and
the measured steps see the same tokens:
- uniform: one epoch of ``warmup + measured`` steps over ``batch x steps`` records; every
  row is alike, so any ``measured`` of them are the same work (``trl-default`` measures
  fewer steps: it is slower, and rates are per token);
- real: two epochs over ``batch x measured`` records; the first is the warm-up, the
  second is measured, so every runner's window holds exactly every record once, whatever
  order its sampler picks (a partial epoch would hold a different length mix per runner).
  No record is truncated (the sample keeps records that fit ``max_length``): tunesmith
  cuts a long DPO prompt from the left, TRL cuts the sequence from the right, so a cut
  record would not be the same work on both sides.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SHARED = Path("/work/shared/datasets/llamafactory-demo")
REAL_FILES = {"sft": SHARED / "alpaca_en_demo.json", "dpo": SHARED / "dpo_en_demo.json"}

WORKLOADS = ("sft-lora", "sft-full", "dpo-lora")
DATASETS = ("uniform", "real")
RUNNERS = ("tunesmith", "tunesmith-fp32", "tunesmith-precompute", "tunesmith-compile", "trl-default", "trl-best", "trl-best-fp32",
           "trl-best-precompute", "plain")
GPU_RUNNERS = ("tunesmith-qlora", "tunesmith-fsdp2", "trl-liger")  # bench/gpu_check.py only

LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
DPO_BETA = 0.1
# Peak learning rates (no effect on speed; TRL's default runner keeps TRL's own).
LEARNING_RATE = {"sft-lora": 2e-4, "sft-full": 2e-5, "dpo-lora": 5e-5}


@dataclass(frozen=True)
class Size:
    batch: int          # records (SFT) or pairs (DPO) per optimizer step; no accumulation
    max_length: int     # tokens per sequence (prompt + response)
    row_tokens: int     # uniform data: tokens per record / per chosen or rejected row
    warmup: int         # uniform: steps excluded from the measurement (real: the whole first epoch)
    measured: int       # steps measured
    slow_measured: int  # uniform: measured steps for trl-default


# Full run (~15 min on 2 cores; the whole bench stays under 20 min with generation, start-up
# and the 60-prompt comparison). Uniform rows are 128 tokens: SFT 8 records a step, DPO 4
# pairs (8 rows, plus the reference forward); one warm-up step (loading, lazy init and the
# *-precompute runners' reference pass fall into it), then 3 measured (trl-default: 2); DPO
# 5 (trl-default 3): its precompute-vs-on-line ratio sits near the 1.25x target, and 3
# steps of a noisy shared machine moved it between 1.24x and 1.37x from run to run.
# Real data runs 2 x measured steps (see above): SFT 2 epochs of 8 Alpaca records that fit
# 512 tokens (976 of its 999 do; ~193 tokens on average under the SmolLM2 template) at 4 a
# step; DPO 2 epochs of 4 dpo_en_demo pairs that fit 384 (61 of its 300; its rows average
# ~700 tokens) at 2 pairs a step.
FULL = {
    ("sft-lora", "uniform"): Size(8, 256, 128, 1, 3, 2),
    ("sft-lora", "real"): Size(4, 512, 128, 0, 2, 2),
    ("sft-full", "uniform"): Size(8, 256, 128, 1, 3, 2),
    ("sft-full", "real"): Size(4, 512, 128, 0, 2, 2),
    ("dpo-lora", "uniform"): Size(4, 256, 128, 1, 5, 3),
    ("dpo-lora", "real"): Size(2, 384, 128, 0, 2, 2),
}
QUICK = Size(2, 64, 48, 1, 2, 2)
QUICK_REAL_MAX_LENGTH = {"sft": 128, "dpo": 256}  # 417 Alpaca records fit 128; only 25 DPO pairs fit 256

# Which runners a default `python -m bench` runs for each workload x dataset (--runners
# picks others, e.g. trl-best-precompute: TRL's own precompute_ref_log_probs). tunesmith-fp32
# and trl-best-fp32 run where the targets need them: the MFU target against the fp32
# matmul peak, and TRL "best" as the issue wrote it (bf16 off).
DEFAULT_RUNNERS = {
    ("sft-lora", "uniform"): ("tunesmith", "tunesmith-fp32", "tunesmith-compile", "trl-default", "trl-best",
                              "trl-best-fp32", "plain"),
    ("sft-lora", "real"): ("tunesmith", "trl-default", "trl-best", "plain"),
    ("sft-full", "uniform"): ("tunesmith", "trl-default", "trl-best", "plain"),
    ("sft-full", "real"): ("tunesmith", "trl-default", "trl-best", "plain"),
    ("dpo-lora", "uniform"): ("tunesmith", "tunesmith-precompute", "tunesmith-compile", "trl-default", "trl-best",
                              "plain"),
    ("dpo-lora", "real"): ("tunesmith", "tunesmith-precompute", "trl-default", "trl-best", "plain"),
}
DPO_ONLY = {"tunesmith-precompute", "trl-best-precompute"}


def size_for(workload: str, dataset: str, quick: bool, steps: int | None) -> Size:
    s = QUICK if quick else FULL[(workload, dataset)]
    if quick and dataset == "real":
        s = Size(s.batch, QUICK_REAL_MAX_LENGTH[workload[:3]], s.row_tokens, 0, s.measured, s.measured)
    if steps:
        slow = steps if dataset == "real" else max(1, steps // 2)
        s = Size(s.batch, s.max_length, s.row_tokens, s.warmup, steps, slow)
    return s


def steps_for(runner: str, dataset: str, size: Size) -> tuple[int, int, int]:
    """(warm-up steps, measured steps, records) of a runner on a dataset."""
    if dataset == "real":  # epoch 1 warms up, epoch 2 is measured: the same records for everyone
        return size.measured, size.measured, size.batch * size.measured
    measured = size.slow_measured if runner == "trl-default" else size.measured
    return size.warmup, measured, size.batch * (size.warmup + measured)


@dataclass
class Spec:
    """One configuration: everything a worker needs, JSON-serialisable."""
    workload: str
    dataset: str
    runner: str
    model: str
    data_file: str
    batch: int
    max_length: int
    warmup: int
    measured: int
    seed: int
    threads: int
    work_dir: str

    @property
    def method(self) -> str:
        return "dpo" if self.workload.startswith("dpo") else "sft"

    @property
    def full(self) -> bool:
        return self.workload == "sft-full"

    @property
    def steps(self) -> int:
        return self.warmup + self.measured

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- data files

WORDS = ("time people year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact water room money story month lot right study book job word business issue "
         "side kind head house service friend father power hour game line end member law car city community "
         "name team minute idea kid body back parent face others level office door health person art war "
         "history party result change morning reason research girl guy moment air teacher force education").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def _fit(make, target: int, measure, start: int) -> dict:
    """Grow or shrink the word count until ``measure(make(n)) == target`` (or closest below)."""
    n, best = start, None
    for _ in range(400):
        rec = make(n)
        length = measure(rec)
        if length == target:
            return rec
        if length < target:
            best = rec
            n += 1
        else:
            if best is not None:
                return best
            n -= 1
    return best or make(max(1, n))


def uniform_sft(tokenizer, n: int, tokens: int, seed: int) -> list[dict]:
    """n single-turn records, each exactly ``tokens`` tokens long under the chat template;
    the prompt is ~a quarter of it, the assistant reply (trained) the rest."""
    from tunesmith.data.tokenize import tokenize_record

    out = []
    for i in range(n):
        rng_seed = seed * 1_000_003 + i
        user = _text(random.Random(rng_seed), max(1, tokens // 8))

        def make(k, user=user, rng_seed=rng_seed):
            return {"messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": _text(random.Random(rng_seed + 7), k)}]}

        out.append(_fit(make, tokens, lambda r: len(tokenize_record(r, tokenizer).input_ids), tokens // 2))
    return out


def uniform_dpo(tokenizer, n: int, tokens: int, seed: int) -> list[dict]:
    """n preference pairs; chosen and rejected rows (prompt + reply) each ``tokens`` long."""
    from tunesmith.data.tokenize import tokenize_preference

    out = []
    for i in range(n):
        rng_seed = seed * 1_000_003 + i
        prompt = [{"role": "user", "content": _text(random.Random(rng_seed), max(1, tokens // 8))}]

        def make(k, prompt=prompt, rng_seed=rng_seed):
            return {"prompt": prompt,
                    "chosen": [{"role": "assistant", "content": _text(random.Random(rng_seed + 1), k)}],
                    "rejected": [{"role": "assistant", "content": _text(random.Random(rng_seed + 2), k)}]}

        def measure(r):
            p = tokenize_preference(r, tokenizer)
            return max(len(p.chosen.input_ids), len(p.rejected.input_ids))

        out.append(_fit(make, tokens, measure, tokens // 2))
    return out


def real_records(method: str, tokenizer, n: int, max_length: int, seed: int) -> list[dict]:
    """A fixed random sample of n demo records that fit max_length untruncated."""
    from tunesmith.data.tokenize import tokenize_preference, tokenize_record
    from tunesmith.data.validate import load_records

    records = load_records(REAL_FILES[method], expect={"preference"} if method == "dpo" else {"sft", "text"})
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    keep = []
    for i in order:
        r = records[i]
        if method == "dpo":
            p = tokenize_preference(r, tokenizer)
            ok = max(len(p.chosen.input_ids), len(p.rejected.input_ids)) <= max_length
        else:
            ok = len(tokenize_record(r, tokenizer).input_ids) <= max_length
        if ok:
            keep.append(r)
        if len(keep) == n:
            return keep
    raise RuntimeError(f"{REAL_FILES[method].name}: only {len(keep)} usable records, {n} needed")


def write_data(folder: Path, workload: str, dataset: str, size: Size, n: int, tokenizer, seed: int) -> Path:
    """The canonical JSONL one workload x dataset trains on (n records / pairs)."""
    from tunesmith.data.validate import write_jsonl

    method = "dpo" if workload.startswith("dpo") else "sft"
    path = folder / f"{method}-{dataset}-{n}x{size.row_tokens if dataset == 'uniform' else size.max_length}.jsonl"
    if path.exists():
        return path
    if dataset == "uniform":
        gen = uniform_dpo if method == "dpo" else uniform_sft
        records = gen(tokenizer, n, size.row_tokens, seed)
    else:
        records = real_records(method, tokenizer, n, size.max_length, seed)
    write_jsonl(records, path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
