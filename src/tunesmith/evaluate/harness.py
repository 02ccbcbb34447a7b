"""lm-evaluation-harness tasks as suites: ``--suite lm-eval:TASK[,TASK…]``.

    tunesmith eval runs/sft-demo --suite lm-eval:my_mc,my_gen --lm-eval-include tasks/

Each task is one suite named ``lm-eval:TASK``, run by lm-eval itself (its prompts, few-shot
contexts, filters and metrics) on the model tunesmith already loaded: ``HFLM`` wraps the
pool's model — adapters over one shared base, the member's tokenizer with the chat template
the run trained with (applied with ``--lm-eval-chat-template``, with the run's
``data.template_kwargs``). So the numbers are lm-eval's own: equal to ``lm_eval --model hf
--model_args pretrained=EXPORT,dtype=float32`` (``peft=ADAPTER`` for an adapter) on the same
export, at the same batch size.

A task's documents are tunesmith's records (id = lm-eval's ``doc_id``; ``--limit N`` runs
the first N, as lm-eval's ``--limit`` does), its per-document metrics the items (``passed``
where the headline metric is 0/1, e.g. ``acc`` or ``exact_match``), the model's answer (the
generated text, or the most likely choice) its output, so ``compare`` lists the documents
that flipped. The aggregate holds the headline metric with a Wilson interval for 0/1 metrics
(or lm-eval's own standard error), every other ``metric,filter`` value lm-eval reported, and
``lm_eval``: the task's entry of lm-eval's results as it gave it.

Offline by design: tasks come from YAML files in ``--lm-eval-include`` folders (or lm-eval's
own task list) with local data (``dataset_path: json`` + ``dataset_kwargs.data_files``); a
hub dataset that is not in the local cache is refused in one sentence before any weights load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from typing import Any

from tunesmith.errors import TunesmithError, describe
from tunesmith.evaluate.stats import rate_summary

PREFIX = "lm-eval:"
_INSTALL = "pip install 'tunesmith[lm-eval]'"
_MANAGERS: dict[tuple, Any] = {}


def is_harness(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def task_names(name: str) -> list[str]:
    """``lm-eval:a,b`` → ``["a", "b"]``."""
    names = [t.strip() for t in name[len(PREFIX):].split(",")]
    if not all(names):
        raise TunesmithError(f"--suite {name!r} names no task (or an empty one); write lm-eval:TASK[,TASK...]")
    return names


# --- tasks ------------------------------------------------------------------------------------


def _require():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TunesmithError(f"the lm-eval suites need the lm-evaluation-harness package; {_INSTALL}") from None


@contextlib.contextmanager
def _quiet(progress: bool = False):
    """lm-eval's own logging (every task's defaults, "pretrained is not a str") below errors,
    its and the datasets library's progress bars only with ``progress``, and datasets offline:
    tunesmith never downloads at run time."""
    import datasets
    import huggingface_hub.constants as hub

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    old = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # both libraries read the offline switch once, at import: set what they read
    offline = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
            yield  # lm-eval's tqdm bars write to sys.stderr; errors still raise
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = offline
        if bars:
            datasets.utils.logging.enable_progress_bar()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if old is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = old


def manager(include: tuple[str, ...], task: str):
    """The lm-eval ``TaskManager`` that knows ``task``. Indexing lm-eval's ~230 built-in task
    folders takes seconds, so a task found in the ``include`` folders alone comes from an
    index of those folders; managers are kept for the process."""
    _require()
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not os.path.isdir(folder):
            raise TunesmithError(f"--lm-eval-include {folder} is not a folder; give a folder of lm-eval task YAML "
                                 f"files")
    with _quiet():
        if include:
            if (include, False) not in _MANAGERS:
                _MANAGERS[include, False] = TaskManager(include_path=list(include), include_defaults=False)
            local = _MANAGERS[include, False]
            if task in local.all_tasks:
                return local
        if (include, True) not in _MANAGERS:
            _MANAGERS[include, True] = TaskManager(include_path=list(include) or None)
        full = _MANAGERS[include, True]
    if task not in full.all_tasks:
        where = f" or in {', '.join(include)}" if include else ""
        local = sorted(_MANAGERS[include, False].all_tasks) if include else []
        raise TunesmithError(f"lm-eval has no task {task!r} among its own tasks{where}"
                             + (f" (the folder holds {', '.join(local) or 'no task YAML'})" if include else "")
                             + "; check the name (`lm_eval ls tasks`), or give the folder of its YAML with "
                               "--lm-eval-include DIR")
    return full


def load_tasks(task: str, include: tuple[str, ...]) -> dict[str, Any]:
    """{leaf task name: lm-eval Task} of ``task`` (one task, or a group's leaves), datasets
    read. A name of several tasks must be a group with an aggregate metric (its one number);
    lm-eval's code-running tasks are refused."""
    tm = manager(include, task)
    try:
        with _quiet():
            loaded = tm.load([task])
    except ConnectionError as e:  # datasets, offline: a hub dataset that is not cached
        raise TunesmithError(f"lm-eval task {task!r} reads a hub dataset that is not in the local cache ({e}); "
                             f"tunesmith runs offline: cache it on a connected machine, or point the task's "
                             f"YAML at local files (dataset_path: json, dataset_kwargs.data_files) in "
                             f"--lm-eval-include DIR") from None
    except FileNotFoundError as e:
        raise TunesmithError(f"lm-eval task {task!r}: a data file is missing ({e}); check dataset_kwargs."
                             f"data_files in its YAML (relative paths are read from the working folder)") from None
    except TunesmithError:
        raise
    except Exception as e:  # YAML, !function imports, Jinja: lm-eval's own message, in one line
        raise TunesmithError(f"lm-eval could not load task {task!r} ({describe(e, 500)}); check its YAML") from None
    leaves, group = loaded["tasks"], loaded["groups"].get(task)
    if len(leaves) > 1 and (group is None or not group.aggregate_metric_list):
        what = "group without aggregate_metric_list" if group is not None else "tag"
        raise TunesmithError(f"lm-eval:{task} is a {what} of {len(leaves)} tasks, so it has no one number; give "
                             f"them one suite each: lm-eval:{','.join(leaves)}")
    unsafe = [name for name, t in leaves.items() if getattr(t, "UNSAFE_CODE", False)]
    if unsafe:
        raise TunesmithError(f"lm-eval task {', '.join(unsafe)} runs the model's output as code (unsafe_code); "
                             f"tunesmith does not run it — use lm_eval --confirm_run_unsafe_code in a sandbox")
    return leaves


def records(task: str, include: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """The task's evaluation documents as records: lm-eval's doc_id, the question as the
    task writes it, the reference. ``limit``: the first N documents of every task (of a
    group's every task), as lm-eval's ``--limit`` takes them."""
    leaves = load_tasks(task, tuple(include))
    records = []
    for leaf, t in leaves.items():
        for i, doc in enumerate(list(t.eval_docs)[:limit]):
            target = t.doc_to_target(doc)
            choices = t.doc_to_choice(doc) if t.OUTPUT_TYPE == "multiple_choice" else None
            if choices is not None and isinstance(target, int) and 0 <= target < len(choices):
                target = choices[target]
            rec = {"id": str(i) if len(leaves) == 1 else f"{leaf}/{i}", "task": leaf, "doc_id": i,
                   "prompt": str(t.doc_to_text(doc)), "reference": str(target)}
            records.append(rec)
    return records


# --- running ----------------------------------------------------------------------------------


def model_args(settings) -> dict[str, Any]:
    """HFLM's arguments that tunesmith sets: what ``lm_eval --model_args`` must match."""
    return {"batch_size": settings.batch_size, "chat_template_args": dict(settings.template_kwargs or {})}


def measure(task: str, subject, records: list[dict], settings) -> dict:
    """Run ``task`` on ``records`` (their documents) with lm-eval, on ``subject.model`` with
    ``subject.tokenizer`` (``runner.Subject``), as ``settings`` (``runner.EvalSettings``) say.
    lm-eval's defaults otherwise (seeds, bootstrap iterations), as ``lm_eval`` runs it."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if settings.lm_eval_chat_template and not subject.tokenizer.chat_template:
        raise TunesmithError(f"--lm-eval-chat-template: {subject.member.label} has no chat template; leave the flag "
                             f"out for it, or give the run data.chat_template")
    include = tuple(settings.lm_eval_include)
    tm = manager(include, task)
    samples: dict[str, list[int]] = {}
    for r in records:
        samples.setdefault(r["task"], []).append(r["doc_id"])
    try:
        with _quiet(settings.progress):
            lm = HFLM(pretrained=subject.model, tokenizer=subject.tokenizer, **model_args(settings))
            out = simple_evaluate(model=lm, tasks=[task], task_manager=tm, samples=samples, log_samples=True,
                                  num_fewshot=settings.lm_eval_fewshot,
                                  apply_chat_template=settings.lm_eval_chat_template,
                                  fewshot_as_multiturn=settings.lm_eval_chat_template)
    except TunesmithError:
        raise
    except Exception as e:  # lm-eval's own refusal of a setting or a document, in one line
        raise TunesmithError(f"lm-eval stopped on task {task!r} with {subject.member.label} ({describe(e, 500)})") \
            from None
    return outcome(task, records, out)


def outcome(task: str, records: list[dict], out: dict) -> dict:
    """tunesmith's ``{items, aggregate, responses}`` of a task from lm-eval's results (with samples)."""
    leaves = list(out["samples"])
    metric, filt = _headline(out, task, leaves)
    by_doc: dict[tuple[str, int], dict] = {}
    for leaf in leaves:  # one sample per document and filter: the headline's filter (else the leaf's first)
        filters = [s.get("filter", "none") for s in out["samples"][leaf]]
        use = filt if filt in filters else (filters[0] if filters else filt)
        for s in out["samples"][leaf]:
            if s.get("filter", "none") == use:
                by_doc.setdefault((leaf, int(s["doc_id"])), s)
    items, responses = [], []
    for r in records:
        s = by_doc[(r["task"], r["doc_id"])]
        item: dict[str, Any] = {"id": r["id"]}
        for m in s.get("metrics", []):
            if isinstance(s.get(m), (int, float)):
                item[m] = float(s[m])
        item["target"] = str(s.get("target"))
        args = s.get("arguments") or []
        if args and isinstance(args[0], (list, tuple)) and args[0] and isinstance(args[0][0], str):
            item["context"] = args[0][0]  # the prompt as lm-eval gave it to the model (few-shot, chat template)
        items.append(item)
        responses.append(_answer(s))
    values = [it.get(metric) for it in items]
    binary = all(v in (0.0, 1.0) for v in values)
    for it, v in zip(items, values):
        it["passed"] = bool(v) if binary and v is not None else None
    result = out["results"][task]
    agg: dict[str, Any] = {"n": len(items)}
    value = result.get(f"{metric},{filt}")
    if binary and len(leaves) == 1 and abs(sum(values) / len(values) - value) < 1e-9:
        agg[metric] = {**rate_summary([bool(v) for v in values]), "value": value}  # a mean of 0/1: Wilson
    else:  # lm-eval's number (a group's aggregate, a corpus metric) with its own standard error
        se = result.get(f"{metric}_stderr,{filt}")
        ok = isinstance(se, (int, float)) and math.isfinite(se)
        agg[metric] = {"value": value, "low": value - 1.96 * se if ok else None,
                       "high": value + 1.96 * se if ok else None}
    for key, v in result.items():
        name, _, f = key.partition(",")
        if f and "_stderr" not in name and isinstance(v, (int, float)) and (name, f) != (metric, filt):
            agg[key] = {"value": v}
    agg["lm_eval"] = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None}
    better = out.get("higher_is_better", {})
    agg["higher_is_better"] = bool((better.get(task) or better.get(leaves[0], {})).get(metric, True))
    agg["n_shot"] = out.get("n-shot", {}).get(leaves[0])
    return {"items": items, "aggregate": agg, "responses": responses, "metric": metric}


def _headline(out: dict, task: str, leaves: list[str]) -> tuple[str, str]:
    """(metric, filter) a table shows: the first metric of the task's metric_list (a group's
    first aggregate metric) under its first filter."""
    result = out["results"][task]
    keys = [k for k in result if "," in k and "_stderr" not in k.partition(",")[0]
            and isinstance(result[k], (int, float))]
    cfg = out.get("configs", {}).get(task, {})  # a single task's metric_list (a group's keys come in its order)
    order = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m.get("metric"), str)]
    for m in order:
        hit = next((k for k in keys if k.partition(",")[0] == m), None)
        if hit:
            return tuple(hit.split(",", 1))  # type: ignore[return-value]
    if not keys:
        raise TunesmithError(f"lm-eval gave no numeric metric for task {task!r}; check its metric_list")
    return tuple(keys[0].split(",", 1))  # type: ignore[return-value]


def _answer(sample: dict) -> str:
    """The model's answer to one document: the (filtered) generated text, or the choice with
    the highest log-likelihood (as lm-eval's ``acc`` picks it)."""
    resp = sample.get("filtered_resps")
    args = sample.get("arguments") or []
    if isinstance(resp, list) and resp and all(isinstance(x, (list, tuple)) and len(x) == 2
                                               and isinstance(x[0], (int, float)) for x in resp):  # (loglik, greedy)
        lls = [float(x[0]) for x in resp]
        best = max(range(len(lls)), key=lls.__getitem__)
        arg = args[best] if best < len(args) else None
        return str(arg[1]).strip() if isinstance(arg, (list, tuple)) and len(arg) > 1 else str(best)
    if isinstance(resp, list):
        return str(resp[0]) if len(resp) == 1 else str(resp)
    return str(resp)
