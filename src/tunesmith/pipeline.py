"""A pipeline: named stages (data check / curate → SFT → preference/RL → compare → export) run
in order under one folder, each remembered by the hash of what went into it.

    tunesmith run examples/pipeline-sft-dpo.yaml

```yaml
name: sft-dpo
output_dir: runs/sft-dpo
model: smollm2-135m-instruct        # default for every train stage
stages:
  - {name: data, check: [data/train.jsonl, data/prefs.jsonl]}
  - {name: clean, curate: {inputs: [data/train.jsonl], eval: [data/eval.jsonl], settings: {split: 0.1}}}
  - {name: sft, train: {method: sft, data: {train: clean, eval: clean}, train: {max_steps: 40}}}
  - {name: dpo, train: {method: dpo, init_from: sft, data: {train: data/prefs.jsonl}}}
  - {name: compare, compare: {models: [base, sft, dpo], suites: [instruction_following]}}
  - {name: export, export: {from: dpo, format: merged}}
```

A curate stage runs ``tunesmith data curate`` (``settings``: its ``--config`` keys) into
``OUTPUT_DIR/<stage>/<stage>.jsonl``; a train stage's ``data.train`` (or a mix entry's
``path``) naming it reads that output, ``data.eval`` its held-out part (``settings.split``).

A train stage is a run config (the same keys as ``tunesmith train``) whose
``output_dir`` is ``OUTPUT_DIR/<stage>``; ``init_from`` (and ``preference.ref_model``,
GRPO reward-model folders) may name an earlier stage. Each train stage runs as the real
command in its own process (``python -m tunesmith train``): a clean memory measurement
per stage, and exactly what a user would run by hand.

Every ``tunesmith run`` ends with ``finish``: the report (``report.html`` + ``report.md``)
of the train stages and the comparison, with sections a caller adds (the quickstart adds its
"Before → after" table).

Re-running: a stage's key is the sha256 of its resolved config, its data files and the
final weights of the stages it reads. A stage records its key in ``lineage.json`` when it
starts (``status: started``, one ``attempts`` entry per start, with the checkpoint step it
resumed from) and again when it is done (``status: done``, with its output). A stage whose
key matches a done entry and whose outputs exist is skipped; a stage with the same key that
did not finish resumes (a train stage with ``--resume`` from its newest checkpoint); a
stage whose key changed runs again (its old folder is kept as ``<stage>.previous``), and so
does everything downstream, whose keys include its output.

One writer: ``tunesmith run`` holds ``OUTPUT_DIR/.tunesmith.lock`` (``files.FolderLock``)
while it writes, so a second ``tunesmith run`` on the same folder is refused. SIGTERM and
SIGINT are forwarded to a running trainer, which finishes its step, checkpoints and exits;
the pipeline waits for it, then stops with one sentence saying how to resume. Outside a
trainer they stop the pipeline at once (every file it writes is replaced atomically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tunesmith import console
from tunesmith.config import _explain, _Section, load_config
from tunesmith.errors import TunesmithError
from tunesmith.files import FolderLock, folder_hash, remove_dir, sha256_file, write_text_atomic
from tunesmith.infer import GENERATION_BATCH
from tunesmith.models.runs import finished_run

LINEAGE = "lineage.json"
BASE = "base"  # the pipeline's model, as a compare entry
REPORT_FILES = ("report.html", "report.md")
# A stage name becomes a folder that is renamed (.previous) and deleted (export), and a
# STAGE.yaml beside it: only a plain name, never a path, a hidden name (atomic_dir's
# .tmp-/.old- leftovers), another stage's .previous/.yaml, or a file the pipeline writes.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STAGE_KINDS = ("check", "curate", "train", "compare", "export")


class LmEvalSpec(_Section):
    include: list[str] = Field(default_factory=list, description="folders of lm-eval task YAML (beside the pipeline)")
    num_fewshot: Optional[int] = Field(None, ge=0, description="few-shot examples per task (default: the task's)")
    chat_template: bool = Field(False, description="prompts through each model's chat template (a run's own)")


class CompareSpec(_Section):
    models: list[str] = Field(description="`base`, stage names or model folders, baseline first")
    suites: list[str] = Field(default_factory=lambda: ["instruction_following"],
                              description="built-in suite names, suite files, or lm-eval:TASK[,TASK...]")
    lm_eval: LmEvalSpec = Field(default_factory=LmEvalSpec, description="settings of the lm-eval:TASK suites")
    max_new_tokens: int = Field(64, gt=0, description="tokens generated per prompt")
    batch_size: int = Field(GENERATION_BATCH, gt=0, description="prompts per generation batch")
    limit: Optional[int] = Field(None, gt=0, description="first N prompts of each suite (quick runs)")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="decoding precision: auto = bf16 weights "
                                                   "where the hardware has native bf16, else fp32")


class ExportSpec(_Section):
    from_: str = Field(alias="from", description="the train stage to export")
    format: Literal["adapter", "merged", "gguf"] = Field(
        "merged", description="adapter, merged weights, or one GGUF file (llama.cpp / Ollama)")
    quant: Optional[str] = Field(None, description="GGUF tensor type (format gguf): f16 by default")

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, v: Optional[str]) -> Optional[str]:
        from tunesmith.export.gguf import QUANTS  # the writer's own list, not a copy

        if v is not None and v not in QUANTS:
            raise ValueError(f"quant {v!r} is not known; use one of {', '.join(QUANTS)}")
        return v


class CurateSpec(_Section):
    inputs: list[str] = Field(default_factory=list, description="data files to curate (or name them in settings.mix)")
    eval: list[str] = Field(default_factory=list, description="eval files whose texts must not leak into training")
    builtin_suites: bool = Field(True, description="decontaminate against tunesmith's own suites too")
    settings: dict[str, Any] = Field(default_factory=dict, description="`tunesmith data curate --config` settings")
    model: Optional[str] = Field(None, description="tokenizer for settings.max_length (default: the pipeline's model)")


class StageSpec(_Section):
    name: str = Field(description="stage name; its folder is OUTPUT_DIR/NAME")
    check: Optional[list[str]] = Field(None, description="data files to validate")
    curate: Optional[CurateSpec] = Field(None, description="data curate: its output is data.train (and, with "
                                         "settings.split, data.eval) of the train stages that name the stage")
    train: Optional[dict[str, Any]] = Field(None, description="a run config (tunesmith train keys)")
    compare: Optional[CompareSpec] = None
    export: Optional[ExportSpec] = None

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        if (not _PLAIN_NAME.fullmatch(name) or name.endswith((".previous", ".yaml"))
                or name in (LINEAGE, *REPORT_FILES)):
            raise ValueError(f"stage name `{name}` is not a plain folder name; use letters, digits, `-`, `_` and `.` "
                             f"(not first, no `.previous`/`.yaml` ending), since it names the folder OUTPUT_DIR/NAME")
        return name

    @model_validator(mode="after")
    def _one_kind(self) -> "StageSpec":
        kinds = [k for k in STAGE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"stage `{self.name}` must have exactly one of check, curate, train, compare, export "
                             f"(it has {', '.join(kinds) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STAGE_KINDS if getattr(self, k) is not None)


class PipelineSpec(_Section):
    name: str = Field("pipeline", description="a name for the report")
    output_dir: str = Field(description="folder holding every stage's run, the lineage and the report")
    model: str = Field("smollm2-135m-instruct", description="default model of the train stages")
    stages: list[StageSpec] = Field(description="stages in order")

    @model_validator(mode="after")
    def _names(self) -> "PipelineSpec":
        seen: set[str] = set()
        for s in self.stages:
            if s.name in seen or s.name == BASE:
                raise ValueError(f"stage name `{s.name}` is used twice or reserved; give each stage its own name")
            seen.add(s.name)
        return self


def load_pipeline(path: str | Path | None, *, raw: dict | None = None, base_dir: Path | None = None) -> PipelineSpec:
    """Read and validate a pipeline file. Relative paths in it are relative to the working
    directory, as in a ``tunesmith train`` config (run it from where its paths make sense)."""
    source = str(path) if path is not None else "pipeline"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise TunesmithError(f"pipeline file {p} does not exist; check the path")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise TunesmithError(f"{p}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if not isinstance(raw, dict):
            raise TunesmithError(f"{p} must hold a mapping with `output_dir:` and `stages:`")
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as err:
        raise TunesmithError(_explain(err, source).replace("tunesmith train --help", "tunesmith run --help")) from None
    spec._base_dir = base_dir or Path.cwd()  # type: ignore[attr-defined]
    return spec


# ------------------------------------------------------------------ hashing and lineage


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Lineage:
    """``lineage.json``: per stage, its key, status, attempts, inputs (with hashes), outputs
    and timings."""

    def __init__(self, out: Path):
        self.path = out / LINEAGE
        self.data = self._read() if self.path.exists() else {"stages": {}}

    def _read(self) -> dict:
        fix = "delete it to re-run every stage (their folders are kept beside, as STAGE.previous)"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError too
            raise TunesmithError(f"{self.path} is not readable JSON ({getattr(e, 'msg', None) or e}); {fix}") from None
        stages = data.get("stages") if isinstance(data, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise TunesmithError(f"{self.path} is not a pipeline lineage (a `stages` mapping of one entry per stage); "
                                 f"{fix}")
        return data

    def get(self, name: str) -> dict:
        return self.data["stages"].get(name, {})

    def finished(self, name: str, key: str) -> bool:
        """The stage finished with ``key`` (entries written before statuses existed count as done)."""
        old = self.get(name)
        return old.get("key") == key and old.get("status", "done") == "done" and "output" in old

    def record(self, name: str, entry: dict) -> None:
        self.data["stages"][name] = entry
        write_text_atomic(self.path, json.dumps(self.data, indent=2))  # a crash never leaves half a lineage file


class _Interrupted(BaseException):
    """SIGTERM/SIGINT while no trainer runs: unwinds like Ctrl-C (atomic writers clean up)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _checkpoint_step(folder: Path) -> int | None:
    """The step of the checkpoint ``--resume`` would start from (the trainer's own choice)."""
    from tunesmith.train.checkpoint import latest_checkpoint, step_of

    latest = latest_checkpoint(folder) if folder.is_dir() else None
    return step_of(latest) if latest is not None else None


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


# ------------------------------------------------------------------------- the runner


class Pipeline:
    def __init__(self, spec: PipelineSpec, *, python: str = sys.executable):
        self.spec = spec
        self.base_dir: Path = getattr(spec, "_base_dir", Path.cwd())
        self.out = self._path(spec.output_dir)
        self.python = python
        self.lineage: Lineage | None = None    # read under the folder's lock, in run()
        self.outputs: dict[str, str] = {}      # stage → output hash (final weights, results)
        self.results: dict[str, Any] = {}      # stage → what the stage returned (comparison, export path)
        self._validated = self._guarded = self._raised = self._starting = False
        self._signal: int | None = None        # SIGTERM/SIGINT received while running
        self._child: subprocess.Popen | None = None  # the trainer now running
        self._current: StageSpec | None = None  # the stage now running

    def _path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.base_dir / q)

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def final_of(self, name: str) -> Path:
        """A train stage's final weights folder (the thing later stages read)."""
        stage = next((s for s in self.spec.stages if s.name == name), None)
        if stage is None or stage.kind != "train":
            known = [s.name for s in self.spec.stages if s.kind == "train"]
            raise TunesmithError(f"`{name}` is not a train stage of this pipeline (train stages: {', '.join(known)}); "
                                 f"name an earlier train stage")
        return self.stage_dir(name) / "final"

    # -- stage resolution ---------------------------------------------------------------
    def _stage_ref(self, value: str, upstream: list[str]) -> str:
        """A stage name → its final/ path (recorded as an upstream input); anything else as is."""
        if any(s.name == value and s.kind == "train" for s in self.spec.stages):
            upstream.append(value)
            return str(self.final_of(value))
        return value

    def train_config(self, stage: StageSpec) -> tuple[dict, list[str], list[str]]:
        """(resolved raw run config, upstream stages, data files) of a train stage."""
        raw = json.loads(json.dumps(stage.train))
        upstream: list[str] = []
        raw.setdefault("model", self.spec.model)
        raw["output_dir"] = str(self.stage_dir(stage.name))
        if raw.get("init_from"):
            raw["init_from"] = self._stage_ref(raw["init_from"], upstream)
            if not upstream and not self._path(raw["init_from"]).exists():
                known = [s.name for s in self.spec.stages if s.kind == "train" and s.name != stage.name]
                raise TunesmithError(f"stage {stage.name}: init_from `{raw['init_from']}` is neither a train stage "
                                     f"({', '.join(known) or 'none'}) nor an existing folder; name an earlier stage")
        if (raw.get("preference") or {}).get("ref_model"):
            raw["preference"]["ref_model"] = self._stage_ref(raw["preference"]["ref_model"], upstream)
        if raw.get("grpo", {}).get("reward_funcs"):
            raw["grpo"]["reward_funcs"] = [self._stage_ref(f, upstream) for f in raw["grpo"]["reward_funcs"]]
        data = raw.get("data") or {}
        files = []
        for key in ("train", "eval"):
            v = data.get(key)
            if v:
                vals = [v] if isinstance(v, (str, dict)) else v
                resolved = [self._data_ref(x, key, upstream, stage.name) for x in vals]
                data[key] = resolved[0] if isinstance(v, (str, dict)) else resolved
                files += [x["path"] if isinstance(x, dict) else x for x in resolved]
        model = raw["model"]
        if (self.base_dir / model).exists():
            raw["model"] = str(self.base_dir / model)
        load_config(None, raw=raw)  # validate now: a bad key fails before any stage runs
        return raw, upstream, files

    def curated(self, name: str, part: str) -> Path | None:
        """A curate stage's output file for data.train (its train part) or data.eval (its held-out
        part, which settings.split makes); None when ``name`` is no curate stage."""
        from tunesmith.data.curate import outputs

        stage = next((s for s in self.spec.stages if s.name == name and s.kind == "curate"), None)
        if stage is None:
            return None
        split = bool(stage.curate.settings.get("split"))
        if part == "eval" and not split:
            raise TunesmithError(f"data.eval names curate stage {name}, which holds nothing out; give it "
                                 f"settings: {{split: 0.1}} or name an eval file")
        return outputs(self.stage_dir(name) / f"{name}.jsonl", split)[part]

    def _data_ref(self, value: Any, part: str, upstream: list[str], stage: str) -> Any:
        """A data.train/data.eval entry: a curate stage's name → its output (an upstream input),
        a path → resolved beside the pipeline; a {path, weight|count} entry likewise."""
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return {**value, "path": self._data_ref(value["path"], part, upstream, stage)}
        if not isinstance(value, str):
            return value  # load_config names what is wrong with it
        out = self.curated(value, part)
        if out is None:
            return str(self._path(value))
        if [s.name for s in self.spec.stages].index(value) > [s.name for s in self.spec.stages].index(stage):
            raise TunesmithError(f"stage {stage}: data.{part} names curate stage {value}, which comes after it; "
                                 f"put the curate stage first")
        upstream.append(value)
        return str(out)

    def _key(self, stage: StageSpec, payload: Any, files: list[str], upstream: list[str]) -> str:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise TunesmithError(f"stage `{stage.name}`: data file {missing[0]} does not exist; check the path")
        return _sha({"stage": stage.kind, "payload": payload, "files": {f: sha256_file(f) for f in files},
                     "upstream": {u: self.outputs.get(u) for u in upstream}})

    # -- running --------------------------------------------------------------------------
    def validate(self) -> None:
        """Resolve every stage before running any (bad keys, unknown stage names)."""
        for stage in self.spec.stages:
            if stage.kind == "train":
                self.train_config(stage)
            elif stage.kind == "export":
                self.final_of(stage.export.from_)
            elif stage.kind == "compare":
                for m in stage.compare.models:
                    self._stage_ref(m, [])
            elif stage.kind == "curate":
                self._curate_config(stage)
        self._validated = True

    @contextlib.contextmanager
    def guard(self):
        """Around everything that writes: the pipeline folder's lock (one ``tunesmith run`` per
        folder) and SIGTERM/SIGINT handling; an interruption ends as one sentence. Re-entrant."""
        if self._guarded:
            yield
            return
        self._guarded = True
        try:
            with self._signals(), FolderLock(self.out, "pipeline folder"):
                yield
        except _Interrupted as e:
            raise TunesmithError(self._interrupted(e.signum)) from None
        finally:
            self._guarded = False

    @contextlib.contextmanager
    def _signals(self):
        try:
            old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        except ValueError:  # not the main thread: signals cannot be handled here
            old = {}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame) -> None:
        self._signal = signum
        if self._child is not None:  # the trainer finishes its step, checkpoints and exits: wait for it
            self._child.send_signal(signum)
        elif not self._starting and not self._raised:  # once: a second signal must not cut the clean-up short
            self._raised = True
            raise _Interrupted(signum)

    def _interrupted(self, signum: int) -> str:
        name, stage = _signal_name(signum), self._current
        if stage is None:
            return (f"the pipeline was interrupted by {name} between stages; run the same `tunesmith run` again "
                    f"to continue (finished stages are skipped)")
        if stage.kind != "train":
            return (f"stage {stage.name} was interrupted by {name}; run the same `tunesmith run` again to redo it "
                    f"(finished stages are skipped)")
        step = _checkpoint_step(self.stage_dir(stage.name))
        if step is None:
            return (f"stage {stage.name} was interrupted by {name} before its first checkpoint; run the same "
                    f"`tunesmith run` again to start it over")
        return (f"stage {stage.name} was interrupted by {name} and keeps its checkpoint at step {step} in "
                f"{self.stage_dir(stage.name)}; run the same `tunesmith run` again to resume it from there")

    def run(self) -> dict:
        if not self._validated:
            self.validate()
        with self.guard():
            self.lineage = Lineage(self.out)
            started = time.time()
            for stage in self.spec.stages:
                self._current = stage
                getattr(self, f"_run_{stage.kind}")(stage)
                self._current = None
                if self._signal is not None:  # it came while a trainer was finishing: stop before the next stage
                    raise _Interrupted(self._signal)
            console.info(f"pipeline {self.spec.name} done in {time.time() - started:.0f} s; lineage in "
                         f"{self.out / LINEAGE}")
        return self.results

    def _skip_or_prepare(self, stage: StageSpec, key: str, done: bool) -> str:
        """'skip' (finished with this key, outputs present), 'resume' (same key, not finished or
        outputs gone) or 'run'."""
        old = self.lineage.get(stage.name)
        folder = self.stage_dir(stage.name)
        if self.lineage.finished(stage.name, key) and done:
            return "skip"
        if old.get("key") == key and folder.exists():
            return "resume"
        if folder.exists():  # its inputs changed: keep the old result beside, run afresh
            prev = folder.with_name(folder.name + ".previous")
            if prev.exists():
                remove_dir(prev)
            folder.rename(prev)
            console.info(f"stage {stage.name}: inputs changed; the previous run is kept in {prev}")
        return "run"

    def _skipped(self, stage: StageSpec, where: object) -> None:
        """An unchanged stage: its recorded output stands for what it would make again."""
        console.info(f"stage {stage.name}: unchanged, skipped ({where})")
        self.outputs[stage.name] = self.lineage.get(stage.name)["output"]

    def _attempts(self, stage: StageSpec, key: str) -> list[dict]:
        """The starts recorded for this stage with this key (a new key starts the count over)."""
        old = self.lineage.get(stage.name)
        return old.get("attempts", []) if old.get("key") == key else []

    def _start(self, stage: StageSpec, key: str, from_step: int | None = None) -> None:
        """Record the key before the stage writes anything: an interruption then resumes it."""
        attempt = {"started": time.time(), **({"from_step": from_step} if from_step is not None else {})}
        self.lineage.record(stage.name, {"kind": stage.kind, "key": key, "status": "started",
                                         "attempts": [*self._attempts(stage, key), attempt]})

    def _finish(self, stage: StageSpec, key: str, t0: float, inputs: dict, output: str, extra: dict | None = None):
        self.outputs[stage.name] = output
        self.lineage.record(stage.name, {"kind": stage.kind, "key": key, "status": "done",
                                         "attempts": self._attempts(stage, key),
                                         "inputs": inputs, "output": output, "seconds": round(time.time() - t0, 1),
                                         "finished": time.time(), **(extra or {})})

    def _run_check(self, stage: StageSpec) -> None:
        from tunesmith.data.validate import check_files

        files = [str(self._path(f)) for f in stage.check]
        key = self._key(stage, None, files, [])
        if self.lineage.finished(stage.name, key):  # the same bytes were checked before
            self._skipped(stage, "data already checked")
            return
        t0 = time.time()
        report = check_files(files)
        bad = [str(e) for e in report.errors][:3]
        if not report.ok:
            raise TunesmithError(f"stage {stage.name}: data check failed ({len(report.errors)} problems; first: "
                                 f"{bad[0]}); run `tunesmith data check FILE` for the full report")
        counts = {f.file: len(f.entries) for f in report.files}
        console.info(f"stage {stage.name}: data check ok — " + ", ".join(f"{Path(k).name} {v}" for k, v in counts.items()))
        self._finish(stage, key, t0, {"files": files}, key, {"records": counts})

    def _curate_config(self, stage: StageSpec):
        """The stage's CurateConfig, its mix paths resolved beside the pipeline."""
        from tunesmith.data.curate import config_from

        settings = dict(stage.curate.settings)
        if isinstance(settings.get("mix"), list):
            settings["mix"] = [{**m, "path": str(self._path(m["path"]))} if isinstance(m, dict) and
                               isinstance(m.get("path"), str) else m for m in settings["mix"]]
        return config_from(settings, f"stage {stage.name}: settings")

    def _run_curate(self, stage: StageSpec) -> None:
        from tunesmith.data.curate import curate, outputs
        from tunesmith.evaluate.scoring import BUILTIN_SUITES, SUITE_DIR

        c, cfg = stage.curate, self._curate_config(stage)
        inputs, evals = [str(self._path(f)) for f in c.inputs], [str(self._path(f)) for f in c.eval]
        suites = [str(SUITE_DIR / f"{name}.jsonl") for name in BUILTIN_SUITES] if c.builtin_suites else []
        files = [*inputs, *(m["path"] for m in cfg.mix if isinstance(m, dict) and m.get("path") not in inputs), *evals,
                 *suites]
        model = (c.model or self.spec.model) if cfg.max_length else None  # whose tokens max_length counts
        key = self._key(stage, {**c.model_dump(), "model": model}, files, [])
        paths = outputs(self.stage_dir(stage.name) / f"{stage.name}.jsonl", cfg.split > 0)
        if self._skip_or_prepare(stage, key, all(p.exists() for p in paths.values())) == "skip":
            self._skipped(stage, paths["train"])
            return
        t0 = time.time()
        self._start(stage, key)
        self.stage_dir(stage.name).mkdir(parents=True, exist_ok=True)
        tokenizer = None
        if model is not None:
            from tunesmith.models import load_tokenizer

            tokenizer = load_tokenizer(model)
        result = curate(inputs, paths["train"].with_name(f"{stage.name}.jsonl"), eval_files=evals,
                        suite_files=suites, cfg=cfg, tokenizer=tokenizer)
        made = [paths[k] for k in ("train", "eval") if k in paths]
        console.info(f"stage {stage.name}: kept {result.kept} of {result.report['records']} records → "
                     f"{', '.join(map(str, made))}; why each removed one went: {paths['removed']}")
        self.results[stage.name] = result.report
        self._finish(stage, key, t0, {"inputs": inputs, "eval": evals}, _sha([sha256_file(p) for p in made]),
                     {"outputs": [str(p) for p in made], "kept": result.kept, "removed": result.removed})

    def _run_train(self, stage: StageSpec) -> None:
        raw, upstream, files = self.train_config(stage)
        key = self._key(stage, raw, files, upstream)
        folder = self.stage_dir(stage.name)
        if folder.exists():
            with FolderLock(folder, "run folder"):  # refused while a trainer (say an orphan) still writes there
                pass
        action = self._skip_or_prepare(stage, key, (folder / "final").is_dir() and (folder / "run.json").exists())
        if action == "skip":
            self._skipped(stage, folder)
            return
        t0 = time.time()
        manifest = finished_run(folder) if action == "resume" else None
        if manifest is not None:  # the trainer finished just before an interruption reached the pipeline
            console.info(f"stage {stage.name}: its run finished before the last interruption; recorded")
        else:
            manifest = self._train(stage, raw, key, action)
        self.results[stage.name] = manifest
        cfg_file = self.out / f"{stage.name}.yaml"
        self._finish(stage, key, t0, {"config": str(cfg_file), "data": {f: manifest["data"].get(f) for f in files},
                                      "upstream": {u: self.outputs.get(u) for u in upstream}},
                     folder_hash(folder / "final"), {"final": str(folder / "final")})

    def _train(self, stage: StageSpec, raw: dict, key: str, action: str) -> dict:
        """Run (or resume) the stage's trainer as ``tunesmith train`` in its own process; its run.json."""
        folder = self.stage_dir(stage.name)
        step = _checkpoint_step(folder) if action == "resume" else None
        self._start(stage, key, from_step=step or 0)
        folder.mkdir(parents=True, exist_ok=True)
        cfg_file = self.out / f"{stage.name}.yaml"
        write_text_atomic(cfg_file, yaml.safe_dump(raw, sort_keys=False))
        cmd = [self.python, "-m", "tunesmith", "train", str(cfg_file)] + (["--resume"] if step else [])
        console.info(f"stage {stage.name}: {f'resuming from step {step}' if step else 'training'} — "
                     f"{' '.join(cmd[2:])}")
        code = self._wait_for_trainer(cmd, {**os.environ, "TUNESMITH_STAGE": stage.name})
        manifest = finished_run(folder)
        if self._signal is not None:
            if manifest is None:
                raise _Interrupted(self._signal)
            return manifest  # it finished as the signal came (it may have died exiting): the stage is done
        if code != 0:
            raise TunesmithError(f"stage {stage.name} failed (exit {code}); its folder {folder} keeps "
                                 f"what was saved — fix the cause and run the pipeline again to resume")
        if manifest is None:
            raise TunesmithError(f"stage {stage.name}: its trainer stopped before the end (a signal sent to it, not "
                                 f"to the pipeline) and {folder} keeps its checkpoints; run the pipeline again to "
                                 f"resume it")
        return manifest

    def _wait_for_trainer(self, cmd: list[str], env: dict) -> int:
        """Run the trainer and always wait for it: a SIGTERM/SIGINT to the pipeline goes on to it."""
        self._starting = True  # a signal now is only recorded; it is forwarded once the trainer exists
        try:
            child = subprocess.Popen(cmd, cwd=str(self.base_dir), env=env)
        except BaseException:
            self._starting = False
            raise
        # Hold signals while the trainer becomes the forwarding target, so one that came
        # during Popen is sent exactly once (Popen returns after exec: the mask is not inherited).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._child, self._starting, pending = child, False, self._signal
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            if pending is not None:
                child.send_signal(pending)
            return child.wait()
        finally:
            if child.poll() is None:  # only if waiting itself failed: never leave the trainer behind
                child.terminate()
                child.wait()
            self._child = None

    def _model_entry(self, name: str) -> tuple[str, str]:
        """(label, spec for load_for_inference) of a compare entry."""
        if name == BASE:
            return BASE, self.spec.model
        if any(s.name == name and s.kind == "train" for s in self.spec.stages):
            return name, str(self.stage_dir(name))
        return Path(name).name, str(self._path(name))

    def _run_compare(self, stage: StageSpec) -> None:
        c = stage.compare
        upstream = [m for m in c.models if any(s.name == m and s.kind == "train" for s in self.spec.stages)]
        suite_files = [str(self._path(s)) for s in c.suites if Path(self._path(s)).is_file()]
        include = [str(self._path(d)) for d in c.lm_eval.include]
        # a changed task YAML or data file beside it reruns the stage (data files elsewhere are not hashed)
        suite_files += sorted(str(f) for d in include if Path(d).is_dir() for f in Path(d).rglob("*") if f.is_file())
        key = self._key(stage, c.model_dump(by_alias=True), suite_files, upstream)
        folder = self.stage_dir(stage.name)
        result_file = folder / "comparison.json"
        if self._skip_or_prepare(stage, key, result_file.exists()) == "skip":
            self._skipped(stage, result_file)
            self.results[stage.name] = json.loads(result_file.read_text())
            return
        t0 = time.time()
        self._start(stage, key)
        folder.mkdir(parents=True, exist_ok=True)
        models = [self._model_entry(m) for m in c.models]
        suites = [str(self._path(s)) if Path(self._path(s)).is_file() else s for s in c.suites]
        from tunesmith.evaluate.compare import compare_models
        from tunesmith.evaluate.runner import EvalSettings

        settings = EvalSettings(lm_eval_include=tuple(include), lm_eval_fewshot=c.lm_eval.num_fewshot,
                                lm_eval_chat_template=c.lm_eval.chat_template, dtype=c.dtype)
        result = compare_models([spec for _, spec in models], suites, max_new_tokens=c.max_new_tokens,
                                batch_size=c.batch_size, limit=c.limit, labels=[label for label, _ in models],
                                settings=settings)
        write_text_atomic(result_file, json.dumps(result, indent=2, default=str))
        self.results[stage.name] = result
        self._finish(stage, key, t0, {"models": dict(models), "suites": suites}, _sha(result.get("metrics")))

    def _run_export(self, stage: StageSpec) -> None:
        from tunesmith.export.export import export_run

        src = stage.export.from_
        key = self._key(stage, stage.export.model_dump(by_alias=True, exclude_none=True), [], [src])
        folder = self.stage_dir(stage.name)
        if self._skip_or_prepare(stage, key, (folder / "tunesmith.json").exists()) == "skip":
            self._skipped(stage, folder)
            self.results[stage.name] = str(folder)
            return
        t0 = time.time()
        self._start(stage, key)
        if folder.exists():
            remove_dir(folder)  # an interrupted export left nothing usable (exports are atomic)
        export_run(self.stage_dir(src), stage.export.format, folder, quant=stage.export.quant)
        self.results[stage.name] = str(folder)
        self._finish(stage, key, t0, {"from": src, "format": stage.export.format, "quant": stage.export.quant},
                     folder_hash(folder),
                     {"folder": str(folder)})


# A report section a caller adds: (title, HTML, Markdown).
Section = tuple[str, str, str]


def finish(spec: PipelineSpec, sections: Callable[[Pipeline], list[Section]] | None = None) -> Pipeline:
    """Run ``spec``, then write the report of its train stages and comparison
    (``report.html`` + ``report.md``), with ``sections(pipeline)`` added, and say where it is.
    A pipeline of data checks only has nothing to report: it says the checks passed."""
    from tunesmith.evaluate.report import build_report

    pipeline = Pipeline(spec)
    pipeline.validate()  # before the lock creates the folder: a bad spec writes nothing
    with pipeline.guard():
        pipeline.run()
        runs = [pipeline.stage_dir(s.name) for s in spec.stages if s.kind == "train"]
        comparison = next((pipeline.results[s.name] for s in spec.stages if s.kind == "compare"), None)
        if not runs and comparison is None:
            checked = [s.name for s in spec.stages if s.kind in ("check", "curate")]
            what = "check passed" if all(s.kind == "check" for s in spec.stages) else "stage finished"
            console.info(f"pipeline {spec.name}: every data {what} ({', '.join(checked) or 'no stages'}); "
                         f"no report, since it has no train or compare stage")
            return pipeline
        extra = sections(pipeline) if sections else []
        html, md = (pipeline.out / name for name in REPORT_FILES)
        text = build_report(runs, comparison, html, None, extra_sections=[(title, body) for title, body, _ in extra])
        write_text_atomic(md, text + "".join(f"\n\n## {title}\n\n{body}\n" for title, _, body in extra))
    export = next((pipeline.results[s.name] for s in spec.stages if s.kind == "export"), None)
    console.info(f"report: {html} (summary {md})" + (f"; exported model: {export}" if export else ""))
    return pipeline
