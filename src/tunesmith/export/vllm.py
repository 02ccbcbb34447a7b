"""Will vLLM serve this export? Said at export time, before a user finds out at ``vllm serve``.

A pure check over the exported files — ``adapter_config.json``, the tensor names and shapes
of ``adapter_model.safetensors`` (read from the header, no weights loaded), the export's
tokenizer — and the base model's ``config.json`` and tokenizer. No vLLM is imported: the
rules below were read from vLLM's own loader, **vLLM 0.33.0** (the wheel on PyPI,
2026-11), and each names the file it comes from:

- ``vllm/lora/peft_helper.py`` (``PEFTHelper._validate_features`` / ``validate_legal``):
  refused are DoRA (``use_dora``), ``modules_to_save`` other than a classification head
  (``classifier`` / ``score``), ``bias`` other than ``"none"``, ``lora_bias``, inits that
  rewrite the base weights (``init_lora_weights`` = pissa, olora, corda, loftq, …), aLoRA,
  ``layer_replication``, BD-LoRA and QALoRA; the largest rank (``r`` and ``rank_pattern``)
  must be ≤ the server's ``--max-lora-rank``. rsLoRA is applied (alpha/√r): nothing to say.
  The inits vLLM takes (``_init_is_supported``) were checked in PEFT 0.21's
  ``peft/tuners/lora/layer.py``: gaussian, eva (B = 0), orthogonal and mica (A = 0) only set
  the first adapter weights, so the saved adapter is right on the plain base. lora_ga is not:
  ``lora_ga_init`` subtracts the initial scaling·B·A from the base weights before training, and
  no loader redoes that (not vLLM; not PEFT either, which falls back to a plain init when no
  gradients are attached), so on the plain base the adapter is another model. vLLM 0.33.0 loads
  it without complaint; this check refuses it, like pissa and olora.
- ``vllm/config/lora.py`` (``LoRAConfig.max_lora_rank``): one of 1, 8, 16, 32, 64, 128, 256,
  320, 512, default 16. A rank above 16 loads with the next choice up (a note, and the flag in
  the serve command); above 512 it cannot load. There is no ``lora_extra_vocab_size`` any more:
  an adapter cannot bring tokens of its own.
- ``vllm/lora/utils.py`` (``parse_fine_tuned_lora_name``): the only tensors read are
  ``*.lora_A.weight`` / ``*.lora_B.weight``, ``*.lora_embedding_A`` / ``*.lora_embedding_B``
  and a classification head's weight/bias; ``*.embed_tokens.base_layer.weight`` and
  ``*.lm_head.base_layer.weight`` are skipped (``is_base_embedding_weights``). Anything else
  (DoRA's ``lora_magnitude_vector``, PEFT's ``trainable_tokens_delta``, a saved module's
  weight) stops the load as an "unsupported LoRA weight".
- ``vllm/lora/worker_manager.py`` + ``vllm/lora/lora_model.py`` (``expected_lora_modules``,
  ``check_unexpected_modules``): each adapted module's last name must be one the model class
  takes LoRA on — its linear layers (``get_supported_lora_modules``: every ``LinearBase``, the
  ``packed_modules_mapping`` expanding ``qkv_proj`` / ``gate_up_proj`` back to the HF names)
  plus the class's ``embedding_modules`` — else "While loading …, expected target modules in
  … but received …". ``lora_model.py`` also refuses an embedding LoRA whose vocabulary is not
  the base's. The per-architecture lists are in ``ARCHITECTURES`` (read from
  ``vllm/model_executor/models/registry.py`` and the model files named there).
- ``vllm/lora/layers/logits_processor.py`` (``create_lora_weights``): where the class takes LoRA
  on ``lm_head``, its vocabulary must be ≤ 258,048 tokens, or LoRA cannot be enabled at all.
- ``vllm/lora/request.py``: a ``LoRARequest`` carries no tokenizer; the server renders every
  request with its one tokenizer and chat template (``--tokenizer``, ``--chat-template``,
  ``--default-chat-template-kwargs`` in ``vllm/entrypoints/common/cli_args.py``). An export whose
  tokenizer or template differs from the base's is served with ``--tokenizer EXPORT``.

A merged export is a plain Hugging Face folder, which vLLM serves as a model (with its
Transformers backend where it has no class of its own): "ok", with the serve command.
A GGUF export is for llama.cpp / Ollama: nothing is recorded. Nor for a reward model (a score
head): vLLM would serve it through its pooling runner, whose classification-head rules
(``model_manager.py``'s ``_validate_classification_head_lora``) this check does not cover.

Recorded in ``tunesmith.json`` as ``"vllm"`` (one shape for every outcome)::

    {"ok": true,                       # false: vLLM refuses it, or serves it as another model (reasons);
                                       # null: the check could not run
     "checked_against": "vLLM 0.33.0", # the version these rules were read from
     "reasons": [],                    # one sentence each: the culprit and the fix
     "notes": ["rank 24 needs ..."],   # what serving it needs beyond vLLM's defaults, and caveats
     "max_lora_rank": 32,              # adapters (refused ones too): the smallest --max-lora-rank that holds it
     "serve": "vllm serve BASE --enable-lora --max-lora-rank 32 --lora-modules NAME=DIR"}  # when ok
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import describe

VLLM_VERSION = "0.33.0"
# vllm/config/lora.py: MaxLoRARanks = Literal[...]; LoRAConfig.max_lora_rank = 16
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
# vllm/lora/layers/logits_processor.py: LogitsProcessorWithLoRA.create_lora_weights
LM_HEAD_LORA_MAX_VOCAB = 258048

_LLAMA_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_BOTH = frozenset({"embed_tokens", "lm_head"})
# HF architecture -> (linear layers vLLM's class takes LoRA on, under their HF names; its
# embedding_modules). vLLM 0.33.0, vllm/model_executor/models/<file>: the registry maps the
# architecture to the class; the linears are its LinearBase layers with packed_modules_mapping
# applied; embedding_modules as the class (or the one it inherits from) declares it.
ARCHITECTURES: dict[str, tuple[frozenset, frozenset]] = {
    "LlamaForCausalLM": (_LLAMA_LINEARS, _BOTH),               # llama.py
    "MistralForCausalLM": (_LLAMA_LINEARS, frozenset()),       # mistral.py: embedding_modules = {} (no embedding LoRA)
    "Qwen2ForCausalLM": (_LLAMA_LINEARS, frozenset()),         # qwen2.py: no embedding_modules
    "Qwen3ForCausalLM": (_LLAMA_LINEARS, _BOTH),               # qwen3.py
    "GemmaForCausalLM": (_LLAMA_LINEARS, frozenset()),         # gemma.py
    "Gemma2ForCausalLM": (_LLAMA_LINEARS, frozenset()),        # gemma2.py
    "Gemma3ForCausalLM": (_LLAMA_LINEARS, frozenset()),        # gemma3.py
    "GraniteForCausalLM": (_LLAMA_LINEARS, _BOTH),             # granite.py
    "Phi3ForCausalLM": (frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}), _BOTH),  # phi3.py (llama's)
}
# vllm/lora/peft_helper.py, PEFTHelper._init_is_supported takes gaussian, eva, orthogonal, mica and
# lora_ga; PEFT 0.21's layer.py: all but lora_ga only set the first adapter weights (lora_ga also
# changes the base weights, see the module docstring)
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
_CLASSIFIER_HEADS = ("classifier", "score")  # peft_helper.py: the modules_to_save vLLM accepts
_MERGED = "export it with --format merged to serve it with vLLM"


@dataclass
class VllmCheck:
    ok: bool | None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    max_lora_rank: int | None = None
    serve: str | None = None

    def to_json(self) -> dict:
        d = {"ok": self.ok, "checked_against": f"vLLM {VLLM_VERSION}", "reasons": self.reasons, "notes": self.notes}
        if self.max_lora_rank is not None:
            d["max_lora_rank"] = self.max_lora_rank
        if self.serve:
            d["serve"] = self.serve
        return d


def line(record: dict) -> str:
    """The one console line for a recorded ``"vllm"`` value."""
    if record.get("ok"):
        notes = f" — {'; '.join(record['notes'])}" if record.get("notes") else ""
        return f"vllm: ok — serve with: {record['serve']}{notes}"
    if record.get("ok") is None:
        return f"vllm: not checked — {'; '.join(record.get('notes') or ['the check could not run'])}"
    return f"vllm: not loadable — {' '.join(record['reasons'])}"


def needed_max_lora_rank(rank: int) -> int | None:
    """The smallest of vLLM's ``--max-lora-rank`` choices that holds ``rank`` (None: none does)."""
    return next((c for c in MAX_LORA_RANKS if c >= rank), None)


# ---------------------------------------------------------------- reading the files


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """{name: shape} from the safetensors header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # an unreadable base tokenizer: the export's is then the one to serve with
        return None


def _tokenizer_difference(export_tok, base_tok) -> str | None:
    """How the export's tokenizer renders differently from the base's (None: alike)."""
    if base_tok is None:
        return "the base folder has no tokenizer that could be read here"
    if len(export_tok) != len(base_tok) or export_tok.get_vocab() != base_tok.get_vocab():
        return f"the export's vocabulary differs from the base's ({len(export_tok)} tokens, {len(base_tok)})"
    if (export_tok.chat_template or None) != (base_tok.chat_template or None):
        return "the export's chat template (the one training used) differs from the base's"
    if export_tok.eos_token != base_tok.eos_token:
        return (f"the export's end-of-sequence token {export_tok.eos_token!r} differs from the base's "
                f"{base_tok.eos_token!r}")
    return None


# ---------------------------------------------------------------- the adapter rules


def _config_reasons(cfg: dict) -> list[str]:
    """peft_helper.py's refusals, read from adapter_config.json."""
    out = []
    if cfg.get("use_dora"):
        out.append(f"DoRA adapters (lora.dora: true) are not loaded by vLLM's LoRA loader; {_MERGED}, or retrain "
                   f"with lora.dora: false.")
    saved = [m for m in cfg.get("modules_to_save") or [] if m not in _CLASSIFIER_HEADS]
    if saved:
        out.append(f"The adapter also trains whole modules (modules_to_save: {', '.join(saved)}), which vLLM's LoRA "
                   f"loader refuses (it takes only a classification head there); {_MERGED}, or retrain without "
                   f"lora.modules_to_save.")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        what = f"bias: {cfg['bias']}" if cfg.get("bias", "none") != "none" else "lora_bias: true"
        out.append(f"The adapter trains biases ({what}), which vLLM's LoRA loader does not support; {_MERGED}.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() == "lora_ga":
        out.append("PEFT's init_lora_weights 'lora_ga' subtracted the initial adapter from the base weights before "
                   "training, and the saved adapter is the trained model only on that changed base: vLLM loads it "
                   "onto the plain base (without complaint) and serves another model; "
                   f"{_MERGED}, or convert it to a plain LoRA with PEFT's save_pretrained("
                   "path_initial_model_for_weight_conversion=…).")
    elif isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        out.append(f"PEFT's init_lora_weights {init!r} also rewrites the base weights when PEFT loads the adapter, "
                   f"which vLLM does not do; {_MERGED}.")
    for key, what in (("alora_invocation_tokens", "activated LoRA (aLoRA)"), ("layer_replication", "layer_replication"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QA-LoRA")):
        if cfg.get(key):
            out.append(f"The adapter uses {what}, which vLLM does not support; {_MERGED}.")
    return out


def _split(name: str) -> tuple[str, str] | None:
    """(module path, kind) of a tensor vLLM reads as LoRA: kind "A"/"B" (linear) or
    "embA"/"embB" (embedding); "base" for the embedding copies vLLM skips; None otherwise."""
    key = name.removeprefix("base_model.model.")
    parts = key.split(".")
    if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
        return ".".join(parts[:-2]), "base"
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2][-1]
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return ".".join(parts[:-1]), "emb" + parts[-1][-1]
    if len(parts) >= 2 and parts[-2] in _CLASSIFIER_HEADS and parts[-1] in ("weight", "bias"):
        return parts[-2], "head"
    return None


def _names(items, limit: int = 3) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@dataclass
class _Scan:
    """What the adapter's tensor names and shapes say: module path → kinds of LoRA weight,
    every rank, tensors that are not LoRA weights, convolutions, vocabulary sizes seen."""

    modules: dict[str, set[str]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)
    unread: list[str] = field(default_factory=list)
    conv: list[str] = field(default_factory=list)
    vocab_dims: set[int] = field(default_factory=set)


def _scan(cfg: dict, shapes: dict[str, list[int]]) -> _Scan:
    scan = _Scan(ranks=[int(cfg.get("r") or 0), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]])
    for name, shape in shapes.items():
        split = _split(name)
        if split is None:
            scan.unread.append(name)
            continue
        module, kind = split
        scan.modules.setdefault(module, set()).add(kind)
        if kind == "A":
            scan.ranks.append(shape[0])
            if len(shape) != 2:
                scan.conv.append(module)
        elif kind == "embA":
            scan.ranks.append(shape[0])
            scan.vocab_dims.add(shape[1])
        elif kind == "base" or (kind == "B" and module.split(".")[-1] == "lm_head"):
            scan.vocab_dims.add(shape[0])
    return scan


def _tensor_reasons(cfg: dict, scan: _Scan, copies: list[str], resized: bool) -> list[str]:
    """Tensors vLLM stops at, less those a reason of their own explains."""
    reasons = []
    explained = ("lora_magnitude_vector",) if cfg.get("use_dora") else ()
    saved = [m for m in cfg.get("modules_to_save") or [] if m not in _CLASSIFIER_HEADS]

    def saved_module(n: str) -> bool:
        path = "." + n.removeprefix("base_model.model.")
        return any(f".{m}." in path for m in saved)

    tokens = [n for n in scan.unread if "trainable_tokens" in n]
    if tokens:
        reasons.append(f"The adapter trains single token embeddings (PEFT trainable_token_indices: "
                       f"{_names(tokens)}), which vLLM's LoRA loader cannot read; {_MERGED}.")
    other = [n for n in scan.unread if n not in tokens and not any(e in n for e in explained) and not saved_module(n)
             and not (resized and n in copies)]
    if other:
        reasons.append(f"Tensor(s) {_names(other)} are not LoRA A/B weights, and vLLM's loader stops at them "
                       f"(\"unsupported LoRA weight\"); {_MERGED}.")
    if scan.conv:
        reasons.append(f"LoRA on convolution layers ({_names(scan.conv)}) is not supported by vLLM; {_MERGED}.")
    return reasons


def _module_reasons(arch: str, scan: _Scan, vocab: int | None) -> tuple[list[str], list[str]]:
    """(reasons, notes) of the modules the model class takes LoRA on."""
    known = ARCHITECTURES.get(arch)
    suffixes = {m.split(".")[-1] for m, kinds in scan.modules.items() if kinds - {"base", "head"}}
    if known is None:
        return [], [f"{arch} is not among the architectures this check knows (the module names were not checked "
                    f"against vLLM's model class): try it with bench/vllm_check.py"]
    reasons = []
    linears, embeddings = known
    bad = sorted(suffixes - linears - embeddings)
    if bad:
        takes = ", ".join(sorted(linears)) + (f", {', '.join(sorted(embeddings))}" if embeddings else "")
        fix = ", ".join(sorted(suffixes & (linears | embeddings))) or "q_proj, v_proj"
        reasons.append(f"vLLM does not apply LoRA to {', '.join(bad)} on {arch} (it takes {takes}); retrain "
                       f"with lora.target_modules: [{fix}], or {_MERGED}.")
    if "lm_head" in embeddings and vocab and vocab > LM_HEAD_LORA_MAX_VOCAB:
        reasons.append(f"vLLM enables LoRA on {arch} only for a vocabulary of at most {LM_HEAD_LORA_MAX_VOCAB:,} "
                       f"tokens and this base has {vocab:,}; {_MERGED}.")
    return reasons, []


def _rank(ranks: list[int]) -> tuple[list[str], list[str], int | None]:
    """(reasons, notes, the --max-lora-rank it needs) of the adapter's largest rank."""
    rank = max(ranks)
    need = needed_max_lora_rank(rank)
    if need is None:
        return [f"Rank {rank} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}; retrain with "
                f"lora.r ≤ {MAX_LORA_RANKS[-1]}, or {_MERGED}."], [], None
    if need > DEFAULT_MAX_LORA_RANK:
        why = "" if need == rank else f", the next of its choices {', '.join(map(str, MAX_LORA_RANKS))}"
        return [], [f"rank {rank} needs --max-lora-rank {need} (vLLM's default is {DEFAULT_MAX_LORA_RANK}{why})"], need
    return [], [], need


def check_adapter(folder: str | Path, base: str | Path, *, tokenizer=None, serve_as: str | Path | None = None,
                  trust_remote_code: bool = False, template_kwargs: dict | None = None) -> VllmCheck:
    """Check the PEFT adapter in ``folder`` against vLLM's LoRA loader, on the base model in
    ``base``. ``tokenizer``: the export's, if already loaded (else read from ``folder``);
    ``serve_as``: the folder name the serve command should use (default ``folder``)."""
    folder, base = Path(folder), Path(base)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":  # the one reason: none of the LoRA rules means anything for it
        return VllmCheck(False, [f"The adapter's peft_type is {cfg['peft_type']} and vLLM loads LoRA adapters "
                                 f"only; {_MERGED}."])
    base_cfg = _json(base / "config.json")
    arch = (base_cfg.get("architectures") or ["?"])[0]
    vocab = _text_config(base_cfg).get("vocab_size")
    shapes = _tensor_shapes(folder / "adapter_model.safetensors")
    scan = _scan(cfg, shapes)

    # whole embedding / head weights (PEFT saves them for modules_to_save, and for a resized
    # vocabulary): their rows are the vocabulary the adapter was trained with
    copies = [n for n in scan.unread if n.endswith(".weight") and {"embed_tokens", "lm_head"} & set(n.split(".")[:-1])]
    scan.vocab_dims |= {shapes[n][0] for n in copies}
    if tokenizer is None:
        tokenizer = _tokenizer(folder)
    grown = [d for d in scan.vocab_dims if vocab and d != vocab]
    resized = bool(vocab and ((tokenizer is not None and len(tokenizer) > vocab) or grown))

    reasons = _config_reasons(cfg) + _tensor_reasons(cfg, scan, copies, resized)
    module_reasons, notes = _module_reasons(arch, scan, vocab)
    reasons += module_reasons
    # the vocabulary: vLLM serves the base's, and an adapter cannot add to it
    if resized:
        size = max([len(tokenizer) if tokenizer is not None else 0, *grown])
        reasons.append(f"The adapter was trained with a resized vocabulary ({size} tokens; the base has {vocab}) and "
                       f"vLLM serves an adapter only on the base's vocabulary (no extra tokens, embedding LoRA of the "
                       f"base's size); {_MERGED}.")
    rank_reasons, rank_notes, need = _rank(scan.ranks)
    reasons, notes = reasons + rank_reasons, notes + rank_notes
    if reasons:  # the rank it needs is kept: what bench/vllm_check.py gives vLLM to see it refuse
        return VllmCheck(False, reasons, notes, need)
    return _serve(folder, base, tokenizer, need, notes, serve_as, trust_remote_code, template_kwargs)


def _serve(folder: Path, base: Path, tokenizer, need: int, notes: list[str], serve_as, trust_remote_code: bool,
           template_kwargs: dict | None) -> VllmCheck:
    """An adapter vLLM loads: the ``vllm serve`` command that serves it as trained."""
    served = Path(serve_as) if serve_as is not None else folder
    flags = ["--enable-lora"]
    if need > DEFAULT_MAX_LORA_RANK:
        flags += ["--max-lora-rank", str(need)]
    diff = _tokenizer_difference(tokenizer, _tokenizer(base)) if tokenizer is not None else None
    if diff:
        notes.append(f"{diff}, and vLLM renders every request with the server's one tokenizer: serve with "
                     f"--tokenizer {served}")
        flags += ["--tokenizer", str(served)]
    name, path = served.name, str(served)
    module = (json.dumps({"name": name, "path": path}) if "," in name + path or "=" in name  # cli_args.py's name=path
              else f"{name}={path}")
    flags += ["--lora-modules", module, *_common_flags(trust_remote_code, template_kwargs)]
    serve = shlex.join(["vllm", "serve", str(base), *flags])
    return VllmCheck(True, [], notes, need, serve)


def _common_flags(trust_remote_code: bool, template_kwargs: dict | None) -> list[str]:
    flags = ["--trust-remote-code"] if trust_remote_code else []
    if template_kwargs:  # the switches training rendered with, e.g. {"enable_thinking": false}
        flags += ["--default-chat-template-kwargs", json.dumps(template_kwargs)]
    return flags


def check_merged(folder: str | Path, *, serve_as: str | Path | None = None, trust_remote_code: bool = False,
                 template_kwargs: dict | None = None) -> VllmCheck:
    """A merged export is a plain HF model folder with its tokenizer: vLLM serves it as it is."""
    served = Path(serve_as) if serve_as is not None else Path(folder)
    return VllmCheck(True, serve=shlex.join(["vllm", "serve", str(served),
                                             *_common_flags(trust_remote_code, template_kwargs)]))


def check_export(folder: str | Path, fmt: str, *, base: str | Path | None = None, task: str = "causal",
                 **kw) -> dict | None:
    """The ``"vllm"`` value for an export in ``folder`` (None: nothing to record — GGUF, a
    reward model). Never raises: a check that cannot run records ``ok: null`` and why."""
    if fmt not in ("adapter", "merged") or task != "causal":
        return None
    try:
        if fmt == "merged":
            return check_merged(folder, **{k: v for k, v in kw.items() if k != "tokenizer"}).to_json()
        return check_adapter(folder, base, **kw).to_json()
    except Exception as e:  # the export itself is fine: say the check did not run, never fail it
        return VllmCheck(None, notes=[f"the vLLM check could not run ({describe(e)})"]).to_json()
