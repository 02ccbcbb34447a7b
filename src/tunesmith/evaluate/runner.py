"""Evaluation: the suite registry, and the loop that runs suites over models.

    from tunesmith.evaluate.runner import EvalSettings, evaluate_models, write_results
    result = evaluate_models(["smollm2-135m-instruct", "runs/sft-demo"], ["instruction_following"],
                             EvalSettings(max_new_tokens=64, limit=12))
    write_results(result, Path("evals/demo"))          # eval.json + generations.jsonl

A suite is a ``SuiteSpec`` in ``SUITES``, in one of two shapes:

- generation suites (``score`` set): records with a ``prompt`` (text or messages); every
  model answers them (``generation.generate``: batched, greedy by default, fixed seed, the
  chat template recorded with the run) and ``score(records, responses)`` returns
  ``{"items": [...], "aggregate": {...}}`` like ``scoring.score_suite``;
- likelihood suites (``measure`` set): the model's log-probabilities of given text
  (held-out loss, preference accuracy; ``likelihood``), nothing generated.

After scoring, every item holds ``passed`` (True/False, or None where an item has no
verdict, as a held-out loss): ``compare`` lists what improved and what regressed from it.
Every aggregate holds ``n`` and, for the suite's headline ``metric``, an entry with
``rate`` (or ``value``), ``low`` and ``high`` (a Wilson or bootstrap 95% interval).

Other code adds a suite with ``register_suite(SuiteSpec(...))``, e.g. the quickstart's
"house format" suite: its own records and a scorer returning per-item ``passed`` and an
aggregate holding ``stats.rate_summary`` entries.

``evaluate_models`` returns plain JSON data, what eval.json holds::

    {"created", "tunesmith", "settings", "models": [{label, spec, kind, describe, method, seconds, ...}],
     "groups": [[labels sharing one copy of weights]], "suites": {name: {description, kind, metric,
     higher_is_better, n}}, "prompts": {suite: [{id, prompt}]}, "results": {suite: {label: {items,
     aggregate}}}, "outputs": {suite: {label: [completion]}}, "refusal_patterns": [...],
     "metrics": {suite: {label: {metric, value, low, high, n}}}}     # the compact view
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from tunesmith import console
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import harness, likelihood
from tunesmith.evaluate.instructions import score_instructions
from tunesmith.evaluate.refusal import REFUSAL_PATTERNS, score_refusal
from tunesmith.evaluate.scoring import BUILTIN_SUITES, SUITE_KINDS, load_suite, score_accuracy
from tunesmith.evaluate.stats import rate_summary
from tunesmith.infer import GENERATION_BATCH
from tunesmith.infer.load import Resolved
from tunesmith.infer.pool import ModelPool
from tunesmith.models.runs import Run, run_dir_of, weights_folder


@dataclass(frozen=True)
class EvalSettings:
    """How every suite runs; one object, so that eval, compare and a pipeline agree."""

    max_new_tokens: int = 256  # tokens generated at most per prompt
    batch_size: int = GENERATION_BATCH  # prompts decoded, or sequences scored, together
    temperature: float = 0.0  # 0 = greedy: the same model and prompt always give the same text
    top_p: float = 1.0  # nucleus mass, with temperature > 0
    seed: int = 0  # sampling seed (greedy decoding does not use it)
    limit: int | None = None  # the first N records of every suite, for quick runs
    max_length: int | None = None  # tokens per scored sequence; None: the first run's data.max_length, else 1024
    train_on: str | None = None  # loss masking; None: the first run's data.train_on, else "assistant"
    reasoning: str | None = None  # traces in scored records; None: the first run's data.reasoning, else "train"
    template_kwargs: dict | None = None  # chat template switches; None: the first run's data.template_kwargs
    # ("the first run": the first of the models that is a run folder)
    mc: str = "generate"  # multiple choice: "generate" (read the letter) or "loglik" (most likely option)
    method: str = "exact_match"  # scoring method of accuracy records that name none
    classifier: str | None = None  # a reward-model folder that also labels refusals: score > threshold
    classifier_threshold: float = 0.0
    lm_eval_include: tuple[str, ...] = ()  # folders of lm-eval task YAML (the lm-eval:TASK suites; harness.py)
    lm_eval_fewshot: int | None = None  # few-shot examples per lm-eval task; None: the task's own num_fewshot
    lm_eval_chat_template: bool = False  # lm-eval prompts through the model's (the run's) chat template
    dtype: str = "auto"  # decoding precision (infer.DTYPES): auto = bf16 weights where the hardware has native bf16
    progress: bool = False  # progress bars on stderr

    def chat(self):
        """How records meet the chat template, as the first run trained (data.render.ChatOptions)."""
        from tunesmith.data.render import ChatOptions

        return ChatOptions(self.reasoning or "train", dict(self.template_kwargs or {}))


@dataclass
class Subject:
    """The model under evaluation as a suite sees it: the loaded model with the member's
    adapter on, the member's tokenizer, and the way to the model it was trained from."""

    member: Resolved
    model: Any
    pool: ModelPool

    @property
    def tokenizer(self):
        return self.member.tokenizer

    def has_reference(self) -> bool:
        return self.pool.has_reference(self.member)

    def reference(self):
        return self.pool.reference(self.member)


@dataclass(frozen=True)
class SuiteInput:
    """What a suite's ``records`` function may use."""

    data: str | None  # the user's file (--data, or NAME=FILE), if any
    run: Run | None  # the first run among the models: its held-out split
    settings: EvalSettings


def item_passed(item: dict) -> bool | None:
    return item.get("passed")


@dataclass(frozen=True)
class SuiteSpec:
    """One suite; set exactly one of ``score`` (generation) and ``measure`` (likelihood)."""

    name: str
    description: str
    records: Callable[[SuiteInput], list[dict]]  # each with an "id"; generation suites: a "prompt"
    metric: str | None  # the aggregate entry tables show; None: unscored prompts (side by side only)
    score: Callable[[list[dict], list[str]], dict] | None = None  # (records, responses) → {items, aggregate}
    measure: Callable[[Subject, list[dict], EvalSettings], dict] | None = None  # → {items, aggregate}
    respond: Callable[[Subject, list[dict], EvalSettings], list[str | None]] | None = None  # answers without
    # generating (None where the model should generate): multiple choice by log-likelihood
    passed: Callable[[dict], bool | None] = item_passed  # an item's verdict for compare
    higher_is_better: bool = True
    takes_data: bool = False  # --data goes to this suite
    classified: bool = False  # the optional refusal classifier also labels its responses
    answers: bool = False  # ``measure`` also returns the model's answer to each record (``responses``)
    limits_itself: bool = False  # ``records`` applies settings.limit itself (per task of an lm-eval group)
    kind_name: str | None = None  # a kind of its own (``"lm-eval"``: run by lm-evaluation-harness, harness.py)

    @property
    def kind(self) -> str:
        return self.kind_name or ("likelihood" if self.measure is not None else "generation")

    @property
    def shows_outputs(self) -> bool:
        """Its prompts and the models' answers go into eval.json (side by side, regressions)."""
        return self.measure is None or self.answers


SUITES: dict[str, SuiteSpec] = {}


def register_suite(spec: SuiteSpec) -> SuiteSpec:
    """Add (or replace) a suite under ``spec.name``; returns it."""
    if (spec.score is None) == (spec.measure is None):
        raise ValueError(f"suite {spec.name!r}: set exactly one of score (generation) and measure (likelihood)")
    SUITES[spec.name] = spec
    return spec


def _builtin_records(name: str) -> Callable[[SuiteInput], list[dict]]:
    """The built-in set, or the user's file in the same format (NAME=FILE)."""
    return lambda inp: load_suite(inp.data or name, BUILTIN_SUITES[name])


def _accuracy_records(inp: SuiteInput) -> list[dict]:
    """Accuracy records (prompt + reference), or an SFT file whose last assistant turns are the references."""
    if not inp.data:
        raise TunesmithError("the accuracy suite needs your records: --data FILE (or accuracy=FILE), JSONL with "
                             "prompt and reference, or SFT records (see tunesmith.evaluate.scoring)")
    if _file_kind(Path(inp.data)) is None:  # not a suite file: SFT records through the data layer
        from tunesmith.infer.generate import read_prompts

        records = [_prompt_record(r, i) for i, r in enumerate(read_prompts(inp.data))]
        if not all("reference" in r for r in records):
            raise TunesmithError(f"{inp.data} holds prompts without answers; the accuracy suite needs SFT records "
                                 "(the last assistant turn is the reference) or prompt + reference records")
        return [{**r, "method": inp.settings.method} for r in records]
    return [{**r, "method": r.get("method", inp.settings.method)} for r in load_suite(inp.data, "accuracy")]


def _unscored(records: list[dict], responses: list[str]) -> dict:
    return {"items": [{"id": r["id"]} for r in records], "aggregate": {"n": len(records)}}


register_suite(SuiteSpec(
    "instruction_following", "prompts with constraints checked by code (IFEval-style): share of prompts "
    "meeting all their constraints", _builtin_records("instruction_following"), "prompt_accuracy",
    score=score_instructions))
register_suite(SuiteSpec(
    "refusal_harmful", "harmful requests the model should decline: refusal rate (refusal-phrase rules)",
    _builtin_records("refusal_harmful"), "refusal_rate", score=score_refusal, passed=lambda it: it["refused"],
    classified=True))
register_suite(SuiteSpec(
    "refusal_benign", "harmless requests that sound alarming: over-refusal rate (lower is better)",
    _builtin_records("refusal_benign"), "refusal_rate", score=score_refusal, passed=lambda it: not it["refused"],
    higher_is_better=False, classified=True))
register_suite(SuiteSpec(
    "accuracy", "your held-out questions with reference answers: exact match, contains, regex, numeric, "
    "multiple choice", _accuracy_records, "accuracy", score=score_accuracy, respond=likelihood.choose_by_loglik,
    takes_data=True))
register_suite(SuiteSpec(
    "loss", "held-out loss (token-weighted NLL of trained tokens, the training masking) and perplexity",
    likelihood.loss_records, "loss", measure=likelihood.measure_loss, higher_is_better=False, takes_data=True))
register_suite(SuiteSpec(
    "preference", "held-out pairs ranked right (chosen above rejected) by reward model or implicit reward",
    likelihood.preference_records, "accuracy", measure=likelihood.measure_preference, takes_data=True))


def harness_suite(task: str) -> SuiteSpec:
    """An lm-evaluation-harness task as a suite (``harness.py``): lm-eval's prompts and
    metrics; its headline metric is named once it ran."""
    return SuiteSpec(f"{harness.PREFIX}{task}", f"lm-evaluation-harness task {task} (lm-eval's prompts and metrics)",
                     lambda inp: harness.records(task, inp.settings.lm_eval_include, inp.settings.limit), None,
                     measure=lambda subject, recs, st: harness.measure(task, subject, recs, st), answers=True,
                     limits_itself=True, kind_name="lm-eval")


def _prompt_record(r: dict, i: int) -> dict:
    """A canonical prompt record as a suite record; an SFT record's answer is its ``reference``."""
    meta = r.get("meta") or {}
    out = {"id": meta.get("id", f"p{i + 1}"), "prompt": r["prompt"]}
    if meta.get("reference") is not None:
        out["reference"] = meta["reference"]
    return out


def prompt_suite(name: str, prompts: str | Path | list) -> SuiteSpec:
    """Unscored prompts — a prompt file (``generation.read_prompts``), or a list of strings
    or message lists — whose outputs are only shown side by side."""
    from tunesmith.infer.generate import read_prompts

    def records(inp: SuiteInput) -> list[dict]:
        if isinstance(prompts, (str, Path)):
            return [_prompt_record(r, i) for i, r in enumerate(read_prompts(prompts))]
        return [{"id": f"p{i + 1}", "prompt": p} for i, p in enumerate(prompts)]

    return SuiteSpec(name, "prompts without a scorer: outputs side by side", records, None, score=_unscored)


def _file_kind(path: Path) -> str | None:
    """The suite kind its first record is marked as (``scoring.SUITE_KINDS``), or None."""
    from tunesmith.data.readers import read_raw

    errors: list = []
    first = next(iter(read_raw(path, errors)), None)
    if errors:
        raise errors[0]
    raw = first[1] if first else None
    return next((kind for kind, (key, _) in SUITE_KINDS.items() if isinstance(raw, dict) and key in raw), None)


def suite_for(name: str | Path) -> SuiteSpec:
    """A registered suite, or one made from a file: suite records (instructions, refusal,
    accuracy; scored like the built-in kind — refusal files as harmful requests), or plain
    prompts (unscored)."""
    name = str(name)
    if name in SUITES:
        return SUITES[name]
    path = Path(name)
    if not path.is_file():
        raise TunesmithError(f"unknown suite {name!r}; use one of {', '.join(SUITES)}, or a suite or prompt file")
    kind = _file_kind(path)
    if kind is None:
        return prompt_suite(name, path)
    like = SUITES[{"instruction_following": "instruction_following", "refusal": "refusal_harmful",
                   "accuracy": "accuracy"}[kind]]
    return dataclasses.replace(like, name=name, records=lambda inp: like.records(dataclasses.replace(inp, data=name)),
                               takes_data=False)


def resolve_suites(suites: list, data: str | Path | None = None) -> list[tuple[SuiteSpec, str | None]]:
    """(suite, its data file) for each of ``suites``: ``SuiteSpec`` objects, names, files, or
    "NAME=FILE". ``data`` goes to the suites that take the user's records."""
    out: list[tuple[SuiteSpec, str | None]] = []
    for s in suites:
        if isinstance(s, SuiteSpec):
            out.append((s, None))
            continue
        if harness.is_harness(str(s)):  # lm-eval:TASK[,TASK...]: one suite per task
            out += [(harness_suite(task), None) for task in harness.task_names(str(s))]
            continue
        name, _, file = str(s).partition("=")
        if file and name in SUITES:
            out.append((SUITES[name], file))
        else:
            spec = suite_for(s)
            out.append((spec, str(data) if data is not None and spec.takes_data else None))
    names = [s.name for s, _ in out]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise TunesmithError(f"suite {twice!r} is given twice; give each suite once")
    if data is not None and not any(s.takes_data for s, _ in out):
        raise TunesmithError(f"--data is for the {', '.join(n for n, s in SUITES.items() if s.takes_data)} suites; "
                             f"for another suite write NAME=FILE, or pass the file itself as the suite")
    return out


# --- running ------------------------------------------------------------------------------


def prompt_messages(record: dict) -> list[dict]:
    p = record["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def display_prompt(record: dict) -> str:
    """The prompt as a report shows it: the text, or the last user turn of a conversation."""
    p = record.get("prompt", record.get("messages", record.get("text", "")))
    if isinstance(p, str):
        return p
    users = [m["content"] for m in p if m.get("role") == "user"]
    return users[-1] if users else str(p[-1].get("content", "")) if p else ""


def run_suite(spec: SuiteSpec, subject: Subject, records: list[dict], settings: EvalSettings
              ) -> tuple[dict, list[str] | None]:
    """(``{"items", "aggregate"}`` with each item's ``passed`` set, responses or None)."""
    from tunesmith.data.messages import split_reasoning
    from tunesmith.infer.generate import generate

    responses: list[str] | None = None
    if spec.measure is not None:
        outcome = spec.measure(subject, records, settings)
        responses = outcome.pop("responses", None) if spec.answers else None
    else:
        responses = spec.respond(subject, records, settings) if spec.respond else [None] * len(records)
        todo = [i for i, r in enumerate(responses) if r is None]
        if todo:
            texts = generate(subject.model, subject.tokenizer, [prompt_messages(records[i]) for i in todo],
                             max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p, seed=settings.seed, batch_size=settings.batch_size,
                             progress=settings.progress, chat=settings.chat(), dtype=settings.dtype)
            for i, text in zip(todo, texts):
                responses[i] = text
        # a reasoning model's answer is scored, not its <think> trace (data.messages.split_reasoning)
        outcome = spec.score(records, [split_reasoning(r)[1] if r else r for r in responses])
    for item in outcome["items"]:
        item["passed"] = spec.passed(item)
    return outcome, responses


class RefusalClassifier:
    """The optional second opinion on refusals: a reward/classifier model (``method: reward``
    run) whose score above ``threshold`` means "refused". Loaded once, on first use."""

    def __init__(self, folder: str, threshold: float):
        self.folder, self.threshold, self.model = Path(folder), threshold, None

    def label(self, outcome: dict, records: list[dict], responses: list[str], batch_size: int) -> None:
        from tunesmith.infer.score import score_conversations
        from tunesmith.models.load import load_scorer

        if self.model is None:
            self.model, self.tokenizer = load_scorer(weights_folder(self.folder))
        scores = score_conversations(self.model, self.tokenizer, [prompt_messages(r) for r in records], responses,
                                     batch_size=batch_size)
        for item, s in zip(outcome["items"], scores):
            item["classifier_score"], item["classifier_refused"] = s, s > self.threshold
        agg = outcome["aggregate"]
        agg["classifier_refusal_rate"] = rate_summary([it["classifier_refused"] for it in outcome["items"]])
        agg["classifier_agreement"] = rate_summary([it["classifier_refused"] == it["refused"]
                                                    for it in outcome["items"]])
        agg["classifier"] = f"{self.folder} (score > {self.threshold:g} = refusal)"


def evaluate_models(specs: list[str], suites: list, settings: EvalSettings | None = None,
                    data: str | Path | None = None, labels: list[str] | None = None) -> dict[str, Any]:
    """Run every suite on every model (``specs``: run folders, exports, base models, adapter
    folders, (base, adapter) pairs; ``labels`` name them, default the specs); models sharing base weights share one
    copy (``pool``). Every spec, suite and record is checked before any weights load.
    Returns the eval.json data (module docstring)."""
    settings = settings or EvalSettings()
    pool = ModelPool(list(specs), labels)
    first_run = next((m.run for m in pool.members if m.run is not None), None)
    trained = (first_run.config.get("data") or {}) if first_run else {}  # score text as the first run trained
    settings = dataclasses.replace(settings, max_length=settings.max_length or trained.get("max_length") or 1024,
                                   train_on=settings.train_on or trained.get("train_on") or "assistant",
                                   reasoning=settings.reasoning or trained.get("reasoning") or "train",
                                   template_kwargs=settings.template_kwargs if settings.template_kwargs is not None
                                   else trained.get("template_kwargs"))
    plan = []
    for spec, file in resolve_suites(suites, data):
        records = spec.records(SuiteInput(file, first_run, settings))
        records = records if spec.limits_itself else records[:settings.limit]
        if not records:
            raise TunesmithError(f"suite {spec.name} has no records")
        plan.append((spec, records))
    scorer = next((m for m in pool.members if m.is_scorer), None)
    if scorer is not None and any(s.shows_outputs for s, _ in plan):  # suites that need the model's own text
        raise TunesmithError(f"{scorer.label} is a reward model: it scores text but cannot generate; "
                             f"evaluate it with --suite preference")
    classifier = RefusalClassifier(settings.classifier, settings.classifier_threshold) if settings.classifier else None
    result = _new_result(pool, plan, settings)
    for member in pool.load_order():
        start = time.perf_counter()
        with pool.use(member) as model:
            console.info(f"{member.describe}")
            for spec, records in plan:
                outcome, responses = run_suite(spec, Subject(member, model, pool), records, settings)
                _named_metric(result, spec, outcome)
                if classifier is not None and spec.classified:
                    classifier.label(outcome, records, responses, settings.batch_size)
                result["results"][spec.name][member.label] = outcome
                if responses is not None:
                    result["outputs"][spec.name][member.label] = responses
                console.info(f"  {spec.name}: "
                             f"{format_headline(outcome['aggregate'], result['suites'][spec.name]['metric'])}")
        info = next(m for m in result["models"] if m["label"] == member.label)
        info["seconds"] = round(time.perf_counter() - start, 2)
    result["metrics"] = headlines(result)
    return result


def _named_metric(result: dict, spec: SuiteSpec, outcome: dict) -> None:
    """A suite whose headline metric is known only once it ran (an lm-eval task's first
    metric) names it in its outcome: it becomes the suite's ``metric``."""
    metric = outcome.pop("metric", None)
    if spec.metric is None and metric is not None:
        info = result["suites"][spec.name]
        info["metric"] = metric
        info["higher_is_better"] = outcome["aggregate"].get("higher_is_better", info["higher_is_better"])


def _decoded_in(dtype: str) -> str:
    """The precision ``dtype`` (auto|fp32|bf16) decodes in on this machine: fp32 or bf16."""
    import torch

    from tunesmith.infer.decode import inference_dtype

    return "bf16" if inference_dtype(dtype) == torch.bfloat16 else "fp32"


def _new_result(pool: ModelPool, plan: list[tuple[SuiteSpec, list[dict]]], settings: EvalSettings) -> dict:
    from tunesmith import __version__

    gen = [(s, r) for s, r in plan if s.shows_outputs]
    return {
        "created": datetime.now().isoformat(timespec="seconds"), "tunesmith": __version__,
        "settings": {**{k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
                     "decoded_in": _decoded_in(settings.dtype)},
        "models": [m.info() for m in pool.members], "groups": pool.groups(),
        "suites": {s.name: {"description": s.description, "kind": s.kind, "metric": s.metric,
                            "higher_is_better": s.higher_is_better, "n": len(r)} for s, r in plan},
        "prompts": {s.name: [{"id": rec["id"], "prompt": display_prompt(rec),
                              **({"reference": str(rec["reference"])} if "reference" in rec else {})}
                             for rec in r] for s, r in gen},
        "results": {s.name: {} for s, _ in plan},
        "outputs": {s.name: {} for s, _ in gen},
        "refusal_patterns": list(REFUSAL_PATTERNS) if any(s.classified for s, _ in plan) else [],
    }


# --- reading results ------------------------------------------------------------------------


def headline(aggregate: dict, metric: str | None) -> tuple[float, float | None, float | None] | None:
    """(value, low, high) of the aggregate's ``metric`` entry, or None when it has none."""
    entry = aggregate.get(metric) if metric else None
    if isinstance(entry, dict) and isinstance(entry.get("rate", entry.get("value")), (int, float)):
        return float(entry.get("rate", entry.get("value"))), entry.get("low"), entry.get("high")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool):
        return float(entry), None, None
    return None


def headlines(result: dict) -> dict[str, dict[str, dict]]:
    """The compact view: ``{suite: {label: {metric, value, low, high, n}}}`` for scored suites."""
    out: dict[str, dict[str, dict]] = {}
    for suite, by_model in result["results"].items():
        metric = result["suites"][suite]["metric"]
        for label, outcome in by_model.items():
            h = headline(outcome["aggregate"], metric)
            if h is not None:
                out.setdefault(suite, {})[label] = {"metric": metric, "value": h[0], "low": h[1], "high": h[2],
                                                    "n": outcome["aggregate"].get("n")}
    return out


def format_headline(aggregate: dict, metric: str | None) -> str:
    h = headline(aggregate, metric)
    if h is None:
        return f"n={aggregate.get('n', '?')}"
    value, low, high = h
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{metric} {value:.3f}{interval} (n={aggregate.get('n', '?')})"


def summary(result: dict, label: str) -> dict[str, dict[str, float]]:
    """``{suite: {metric: number}}`` for one model (the model card's evaluation table):
    every aggregate entry holding a rate or value (intervals left out), and ``n``."""
    out: dict[str, dict[str, float]] = {}
    for suite, by_model in result["results"].items():
        agg = by_model.get(label, {}).get("aggregate")
        if agg is None:
            continue
        found = {key: headline(agg, key) for key, v in agg.items() if isinstance(v, dict)}
        out[suite] = {**{k: h[0] for k, h in found.items() if h is not None}, "n": agg.get("n", 0)}
    return out


# --- writing results ------------------------------------------------------------------------


def single_run(specs: list) -> Path | None:
    """The run folder when ``specs`` is exactly one run folder (``tunesmith eval RUN``)."""
    if len(specs) != 1 or not isinstance(specs[0], (str, Path)):  # not one, or a (base, adapter) pair
        return None
    return run_dir_of(specs[0])


def default_output(specs: list) -> Path:
    """RUN/eval for a single run folder, else evals/<timestamp>."""
    run = single_run(specs)
    return run / "eval" if run else Path("evals") / datetime.now().strftime("%Y%m%d-%H%M%S")


def write_results(result: dict, out: Path) -> Path:
    """eval.json (everything) and generations.jsonl (one line per model x prompt) in ``out``,
    each replaced in one rename: an interrupted write leaves the previous file whole."""
    from tunesmith.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    lines = []
    for suite, by_model in result["outputs"].items():
        for label, responses in by_model.items():
            items = result["results"][suite][label]["items"]
            for rec, text, item in zip(result["prompts"][suite], responses, items):
                lines.append(json.dumps({"model": label, "suite": suite, "id": rec["id"], "prompt": rec["prompt"],
                                         "completion": text, "passed": item.get("passed")}, ensure_ascii=False) + "\n")
    write_text_atomic(out / "generations.jsonl", "".join(lines))
    return out


def write_summary(result: dict, label: str, run_dir: Path) -> Path:
    """RUN/eval/summary.json, merged with what an earlier ``tunesmith eval`` of other suites
    wrote, replaced in one rename (the earlier suites' numbers are never half-lost)."""
    from tunesmith.files import write_text_atomic

    path = run_dir / "eval" / "summary.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        old = None
    if not isinstance(old, dict):
        raise TunesmithError(f"{path} is not a JSON object of suite results; delete it (`tunesmith eval` writes it "
                             f"again, with this run's suites only)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({**old, **summary(result, label)}, indent=1) + "\n")
    return path


def run_eval(specs: list, suites: list, settings: EvalSettings, data: str | Path | None = None,
             output: Path | None = None) -> tuple[dict, Path]:
    """``tunesmith eval``: evaluate, write eval.json + generations.jsonl to ``output`` (default
    ``default_output``), and for a single run folder also RUN/eval/summary.json."""
    result = evaluate_models(specs, suites, settings, data)
    out = write_results(result, output or default_output(specs))
    run = single_run(specs)
    if run is not None:
        write_summary(result, result["models"][0]["label"], run)
    return result, out
