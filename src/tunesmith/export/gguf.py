"""A merged model as one GGUF file (llama.cpp, Ollama, LM Studio), built on the ``gguf`` package.

    write_gguf(model, tokenizer, "exports/run/model-q8_0.gguf", quant="q8_0")

ggml's own Python package gives the file writer, the tensor-name map and the quantizers;
what is ours is the decision of what goes in, because that is where exports break (a
mismatched chat template, a wrong pre-tokenizer, unpermuted q/k):

- **Architectures**: the llama family transformers can read back from GGUF — ``llama``
  (SmolLM2, Llama), ``mistral`` (written as llama, as llama.cpp does), ``qwen2``, ``qwen3``.
  Anything else, rope scaling other than the default, and biases a llama block does not
  have are refused in one sentence before a byte is written.
- **Layout**: llama.cpp applies rotary embeddings to interleaved pairs where transformers'
  llama rotates the two halves of each head, so llama's (and mistral's) q and k projection
  rows are reordered per head — half i of a head's rows goes to positions 2i and 2i+1.
  Qwen2/3 use the NeoX (halves) layout in llama.cpp too: no reordering.
- **Tensor types**: 1-D tensors (norms, biases) stay F32; matrices take ``quant`` (F16, BF16,
  Q8_0, Q4_0); a matrix whose rows are not a multiple of the quant's block (32 values) is
  written F16 and said.
- **Tokenizer**: byte-level BPE only (SmolLM2, Llama-3, Qwen2/3): every token in id order with
  its type (special added tokens are CONTROL, other added ones USER_DEFINED), the merges,
  BOS/EOS/pad/unk, whether BOS is added, and the chat template the run trained with. The
  pre-tokenizer name tells llama.cpp how to split text before BPE: ``gpt-2`` for a plain
  ``ByteLevel(use_regex=True)`` (exactly GPT-2's regex), ``llama-bpe`` / ``qwen2`` for the
  Split-regex tokenizers of those families; the verify step compares llama.cpp's tokens with
  transformers' on the reference prompts, so a wrong guess is caught, not shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import TunesmithError

QUANTS = ("f16", "bf16", "q8_0", "q4_0")
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
_PERMUTED = ("llama", "mistral")  # q/k rows reordered for llama.cpp's interleaved rotary pairs


def _gguf():
    try:
        import gguf
    except ImportError:  # transformers' own GGUF support needs it too; pinned in constraints.txt
        raise TunesmithError("the gguf package is not installed; run `bash scripts/setup.sh` (or pip install "
                             "'tunesmith[gguf]')") from None
    return gguf


def check_exportable(config, tokenizer) -> None:
    """Refuse, in one sentence, what this writer would not get right."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHS:
        raise TunesmithError(f"GGUF export supports the llama family ({', '.join(ARCHS)}); this model is "
                             f"{kind!r} — export --format merged and convert it with llama.cpp's own script")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise TunesmithError(f"GGUF export does not write {rope.get('rope_type', rope.get('type'))!r} rope scaling "
                             "yet; export --format merged instead")
    if kind in ("llama", "mistral") and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise TunesmithError("GGUF export: this llama model has attention or MLP biases, which llama.cpp's llama "
                             "blocks do not read; export --format merged instead")
    if _bpe(tokenizer) is None:
        raise TunesmithError("GGUF export writes byte-level BPE tokenizers (SmolLM2, Llama-3, Qwen); this one is "
                             "not — export --format merged and convert it with llama.cpp's own script")


def _bpe(tokenizer) -> dict | None:
    """The tokenizer.json of a byte-level BPE fast tokenizer, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
    return spec if model.get("type") == "BPE" and "ByteLevel" in pre else None


def pre_tokenizer(tokenizer, model_type: str) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (module docstring)."""
    pre = (_bpe(tokenizer) or {}).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's own split (its tokenizer model is "gpt2")
    return "qwen2" if model_type.startswith("qwen") else "llama-bpe"


def _merges(spec: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _tokens(tokenizer) -> tuple[list[str], list[int]]:
    gguf = _gguf()
    n = len(tokenizer)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        a = added.get(i)
        kind = gguf.TokenType.NORMAL if a is None else gguf.TokenType.CONTROL if a.special else \
            gguf.TokenType.USER_DEFINED
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(int(kind))
    return tokens, types


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from transformers' halves order to llama.cpp's interleaved pairs."""
    out, cols = w.shape[0], w.shape[1:]
    return w.reshape(heads, 2, out // heads // 2, *cols).transpose(1, 2).reshape(out, *cols)


def _ftype(gguf, quant: str):
    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]


def _qtype(gguf, quant: str):
    return {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]


def _hparams(writer, config, quant: str, gguf) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_ftype(gguf, quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tokenizer_kv(writer, tokenizer, model_type: str) -> None:
    spec = _bpe(tokenizer)
    tokens, types = _tokens(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec))
    for add, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                     (writer.add_pad_token_id, tokenizer.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if tid is not None:
            add(int(tid))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model, config, quant: str, gguf) -> tuple[list[tuple[str, np.ndarray, object]], list[str]]:
    """(gguf name, data, type) of every tensor, and the names written F16 for their shape."""
    kind = config.model_type
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[kind]), config.num_hidden_layers)
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    qtype = _qtype(gguf, quant)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    out, fallback = [], []
    for hf_name, t in state.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the token embedding as the output head when there is none
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunesmithError(f"GGUF export: no GGUF name for the tensor {hf_name}; export --format merged")
        t = t.detach().to(torch.float32)
        if kind in _PERMUTED and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute(t, heads if "q_proj" in hf_name else kv)
        data = t.numpy()
        if data.ndim == 1:
            out.append((name, data, gguf.GGMLQuantizationType.F32))
            continue
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block:
            fallback.append(name)
            out.append((name, data.astype(np.float16), gguf.GGMLQuantizationType.F16))
            continue
        out.append((name, gguf.quants.quantize(data, qtype), qtype))
    return out, fallback


def modelfile(gguf_name: str, stops: list[str], system: str | None) -> str:
    """An Ollama Modelfile for the file: ``ollama create NAME -f Modelfile``. Ollama reads the
    chat template from the GGUF itself; the stop tokens and the training system prompt are
    said here because Ollama's defaults do not know them."""
    lines = [f"FROM ./{gguf_name}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops) if s]
    if system:
        lines.append('SYSTEM """' + system.replace('"""', '\\"\\"\\"') + '"""')
    return "\n".join(lines) + "\n"


def write_gguf(model, tokenizer, path: str | Path, *, quant: str = "f16", name: str = "tunesmith export") -> dict:
    """Write ``model`` (a merged causal LM, fp32) and ``tokenizer`` to ``path``; returns what
    was written: architecture, quant, pre-tokenizer, tensors written F16 for their shape."""
    if quant not in QUANTS:
        raise TunesmithError(f"--quant {quant!r} is not known; use one of {', '.join(QUANTS)}")
    gguf = _gguf()
    config = model.config
    check_exportable(config, tokenizer)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHS[config.model_type])]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    _hparams(writer, config, quant, gguf)
    _tokenizer_kv(writer, tokenizer, config.model_type)
    tensors, fallback = _tensors(model, config, quant, gguf)
    for tname, data, qtype in tensors:
        writer.add_tensor(tname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "quant": quant, "pre_tokenizer": pre_tokenizer(tokenizer, config.model_type),
            "f16_for_shape": fallback, "tensors": len(tensors)}
