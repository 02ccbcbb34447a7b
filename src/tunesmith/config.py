"""The run config: one YAML file per run, typed and validated before any weights load.

    tunesmith train sft.yaml --set train.learning_rate=1e-4 --set lora.r=16

Every field has a one-line description with its unit. An unknown key, a wrong type or an
impossible value fails with one sentence naming the key, the value and the fix
("did you mean `learning_rate`?"). Components never see this object: recipes turn it
into plain keyword arguments.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import TunesmithError


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` pass `gt=0` checks (epochs: .inf never ends,
    # learning_rate: .nan trains garbage), so every float must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class MixSource(_Section):
    path: str = Field(description="a training data file")
    weight: Optional[float] = Field(None, ge=0.0, description="times each record goes in (0.5: half drawn, 2: twice)")
    count: Optional[int] = Field(None, ge=0, description="records taken from it (drawn; more than it holds: copies)")

    @model_validator(mode="after")
    def _one(self) -> "MixSource":
        if self.weight is not None and self.count is not None:
            raise ValueError(f"{self.path} has both weight and count; give one")
        return self


class DataConfig(_Section):
    train: Union[str, list[Union[str, MixSource]]] = Field(
        description="training data file(s): JSONL, JSON, CSV or Parquet; list entries may be {path, weight} or "
        "{path, count} to mix sources (seeded by train.seed)")
    eval: Optional[Union[str, list[str]]] = Field(None, description="held-out data file(s)")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of train held out when `eval` is not given")
    max_length: int = Field(512, gt=8, description="maximum tokens per sequence (prompt + response)")
    format: Optional[str] = Field(None, description="force a data format instead of auto-detection")
    columns: Optional[dict[str, str]] = Field(None, description="canonical field -> source column mapping")
    train_on: Literal["assistant", "all", "last"] = Field(
        "assistant", description="which tokens train: assistant turns, all tokens, or the last assistant turn")
    packing: bool = Field(False, description="pack several records into one sequence (block-diagonal attention)")
    group_by_length: bool = Field(True, description="batch records of similar length together to cut padding")
    on_overflow: Literal["error", "drop"] = Field(
        "error", description="a record whose trained tokens would all be truncated: refuse the run, or drop it")
    special_tokens_in_content: Literal["error", "text"] = Field(
        "error", description="a special token such as `<|im_end|>` written inside a record's text: refuse the "
        "run (it would become a control token, e.g. a fake turn boundary), or keep it as plain text tokens")
    reasoning: Literal["train", "answer_only", "drop"] = Field(
        "train", description="reasoning traces on assistant turns: train them with the answer, keep them as "
        "context only (-100), or drop them")
    template_kwargs: Optional[dict[str, Any]] = Field(
        None, description="switches passed to the chat template, e.g. {enable_thinking: false} (Qwen3)")
    chat_template: Optional[str] = Field(
        None, description="chat template override: a Jinja file, or a family name (chatml, llama3, gemma, mistral, "
        "qwen3); the exported tokenizer carries it")


class LoraConfig(_Section):
    r: int = Field(8, gt=0, description="adapter rank")
    alpha: float = Field(16, gt=0, description="scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: Union[str, list[str]] = Field("all-linear", description="module names, or `all-linear`")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")
    dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    qlora: bool = Field(False, description="4-bit NF4 base through bitsandbytes (CUDA only)")
    modules_to_save: Optional[list[str]] = Field(None, description="extra modules trained in full, e.g. [lm_head]")


class TrainConfig(_Section):
    epochs: float = Field(1, gt=0, description="passes over the training data")
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides epochs")
    batch_size: int = Field(8, gt=0, description="records per micro-batch (per process)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of steps spent warming up")
    warmup_steps: int = Field(0, ge=0, description="warmup steps; > 0 overrides warmup_ratio")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping norm; 0 disables")
    seed: int = Field(0, description="seed for initialisation, shuffling and dropout")
    save_steps: int = Field(50, ge=0, description="checkpoint every N optimizer steps; 0 = only at the end")
    save_total_limit: Optional[int] = Field(2, ge=1, description="keep the last K checkpoints (K >= 1; null keeps "
                                            "them all)")
    eval_steps: int = Field(50, ge=0, description="evaluate every N optimizer steps; 0 = only at the end")
    logging_steps: int = Field(1, gt=0, description="log train metrics every N optimizer steps")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="compute dtype; auto = bf16 only where fast")
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="recompute activations; auto = only when memory requires it")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the decoder layers; auto = where measured faster (SFT, bf16 on a CPU, long runs)")
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="several processes: ddp (whole copies) or fsdp2 (weights, gradients, optimizer sharded)")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads (>= 1); default = cores")
    max_nonfinite: int = Field(5, gt=0, description="stop after N consecutive non-finite losses/gradients")
    memory_limit_gib: Optional[float] = Field(None, description="memory budget for the fit check; default = device memory")

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return ("on" if v else "off") if isinstance(v, bool) else v  # YAML reads a bare on/off as a bool


class PreferenceConfig(_Section):
    beta: float = Field(0.1, gt=0, description="inverse temperature of the implicit reward (DPO/IPO/KTO/ORPO lambda)")
    loss_type: str = Field("sigmoid", description="DPO loss variant: sigmoid, hinge, ipo, robust")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="assumed label-noise rate (cDPO / robust)")
    precompute_ref: bool = Field(False, description="compute reference log-probs once and store them with the run")
    ref_model: Optional[str] = Field(None, description="a different reference model/checkpoint folder")
    sft_weight: float = Field(0.0, ge=0.0, description="weight of an NLL term on the chosen response")
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin gamma (in beta units: gamma/beta ratio 0.5)")
    desirable_weight: float = Field(1.0, gt=0, description="KTO weight of desirable examples")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO weight of undesirable examples")


class RewardConfig(_Section):
    center_coefficient: float = Field(0.0, ge=0.0, description="weight of mean((r_chosen + r_rejected)^2), keeping rewards centred at 0 (TRL's center_rewards_coefficient; 0.01 is typical)")
    margin: float = Field(0.0, description="required reward margin: loss = -log sigmoid(r_chosen - r_rejected - margin)")


class GRPOConfig(_Section):
    num_generations: int = Field(4, ge=2, description="completions sampled per prompt (the group size G)")
    max_new_tokens: int = Field(64, gt=0, description="longest completion, in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1.0, description="nucleus sampling mass")
    beta: float = Field(0.04, ge=0.0, description="KL coefficient against the reference (0 = no reference pass)")
    epsilon: float = Field(0.2, gt=0, description="clip range of the policy ratio (lower side)")
    epsilon_high: Optional[float] = Field(None, gt=0, description="upper clip range (DAPO's clip-higher); default = epsilon")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dr_grpo", description="token aggregation: grpo (per-sequence mean), bnpo/dapo (token mean), dr_grpo (sum / (G*max_new_tokens))")
    scale_rewards: bool = Field(False, description="divide advantages by the group's reward std (Dr. GRPO recommends off)")
    num_iterations: int = Field(1, ge=1, description="optimizer steps per generated batch (mu); > 1 uses the clipped ratio")
    reward_funcs: list[str] = Field(description="`module:function` (prompts, completions → floats) or a reward model folder")
    reward_weights: Optional[list[float]] = Field(None, description="weight of each reward; default 1.0 each")
    log_completions: int = Field(2, ge=0, description="sampled completions written to completions.jsonl per logging step")


class RunConfig(_Section):
    model: str = Field("smollm2-135m-instruct", description="local folder, cached hub id, or an embedded model name")
    method: Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto", "reward", "grpo"] = Field("sft", description="training method")
    data: DataConfig
    lora: Optional[LoraConfig] = Field(default_factory=LoraConfig, description="adapter settings; null with full: true")
    full: bool = Field(False, description="full fine-tuning (no adapter)")
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: Optional[PreferenceConfig] = None
    reward: Optional[RewardConfig] = None
    grpo: Optional[GRPOConfig] = None
    init_from: Optional[str] = Field(None, description="an earlier run's final/ folder to start from")
    output_dir: str = Field("runs/run", description="run folder: config, metrics, checkpoints, final/")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="experiment trackers, any of: tensorboard, wandb, mlflow, trackio (the "
        "metrics of metrics.jsonl; --resume continues the same tracker runs)")
    resume: Union[bool, Literal["auto"]] = Field(False, description="continue from the newest complete checkpoint")
    trust_remote_code: bool = Field(False, description="allow model code from the model folder")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None or v == "none":
            return []
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.full:
            self.__dict__["lora"] = None  # full fine-tuning ignores adapter defaults
        elif self.lora is None:
            raise ValueError("lora: is null but full is false; set `full: true` for full fine-tuning "
                             "or give a `lora:` section")
        if self.method in ("dpo", "ipo", "simpo", "orpo", "kto") and self.preference is None:
            self.__dict__["preference"] = PreferenceConfig()
        if self.method == "reward" and self.reward is None:
            self.__dict__["reward"] = RewardConfig()
        if self.method == "grpo":
            if self.grpo is None:
                raise ValueError("method grpo needs a `grpo:` section with at least `reward_funcs: [module:function "
                                 "or a reward model folder]`")
            w = self.grpo.reward_weights
            if w is not None and len(w) != len(self.grpo.reward_funcs):
                raise ValueError(f"grpo.reward_weights has {len(w)} values for {len(self.grpo.reward_funcs)} "
                                 f"reward_funcs; give one weight per reward")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading

def _all_field_names(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for f in model.model_fields.values():
        for t in getattr(f.annotation, "__args__", (f.annotation,)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                names |= _all_field_names(t)
    return names


def _section_for(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        f = model.model_fields.get(str(part))
        if f is None:
            break
        for t in getattr(f.annotation, "__args__", (f.annotation,)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
    return model


def _explain(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union["))))
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = e.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{…}"
    if len(shown) > 60:
        shown = shown[:57] + "…"
    if e["type"] == "extra_forbidden":
        section = _section_for(loc)
        close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys here: {', '.join(section.model_fields)}"
        return f"{source}: unknown key `{key}`; {hint}"
    if e["type"] == "missing":
        return f"{source}: `{key}` is required; add it (see `tunesmith train --help` for an example config)"
    if e["type"] == "value_error":
        return f"{source}: {e['msg'].removeprefix('Value error, ')}"
    section = _section_for(loc)
    field = section.model_fields.get(str(loc[-1])) if loc else None
    what = f" ({field.description})" if field is not None and field.description else ""
    return f"{source}: `{key}` = {shown} is invalid: {e['msg'].lower()}{what}"


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise TunesmithError(f"--set {item!r} needs the form key.sub=value, e.g. --set train.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, raw: dict | None = None) -> RunConfig:
    """Read a YAML file (or a dict), apply ``--set`` overrides, validate. Errors are one sentence."""
    source = str(path) if path is not None else "config"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.exists():
            raise TunesmithError(f"config file {p} does not exist; check the path")
        if p.is_dir():
            raise TunesmithError(f"{p} is a folder, not a config file; pass a YAML file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise TunesmithError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
        if raw is None:
            raise TunesmithError(f"{p} is empty; a run config needs at least `data: {{train: FILE}}`")
        if not isinstance(raw, dict):
            raise TunesmithError(f"{p} must hold a mapping of keys (model:, method:, data:, …), not a {type(raw).__name__}")
    raw = apply_overrides(dict(raw), overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise TunesmithError(_explain(err, source)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
