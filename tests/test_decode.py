"""tunesmith's decode engine (``infer.decode``) against transformers on tiny random models of every
architecture it covers: the same logits in fp32, the same greedy tokens under left padding and
per-row stops, bf16 within bf16's tolerance, adapters merged / disabled / live, sampling, and the
fallback to transformers' ``generate`` for what it does not cover."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from tunesmith.infer.decode import Decoder, Greedy, Sample, TransformersDecode, decode, decoder_for, inference_dtype

VOCAB = 96


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "llama-tied-rope-scaled":  # SmolLM2's tied head, Llama-3.1's rope scaling
        return LlamaConfig(**{**common, "tie_word_embeddings": True},
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":  # q/k/v biases
        return Qwen2Config(**common)
    if kind == "qwen3":  # q_norm / k_norm per head, head_dim apart from hidden/heads
        return Qwen3Config(**common, head_dim=16)
    if kind == "gemma":
        return GemmaConfig(**common, head_dim=8)
    raise KeyError(kind)


def _model(kind: str, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa").float().eval()
        with torch.no_grad():  # a random init's logits are nearly flat; widen them so greedy has margins
            model.model.norm.weight.mul_(8.0)
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def _prompts(lengths=(7, 3, 11), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _hf(model, ids, mask, n, stop):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, top_k=None,
                         top_p=None, temperature=None, eos_token_id=stop, pad_token_id=0)
    return out[:, ids.shape[1]:]


ARCHITECTURES = ["llama", "llama-tied-rope-scaled", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_fp32_logits_and_greedy_tokens_match_transformers(kind):
    model = _model(kind)
    ids, mask = _prompts()
    engine = Decoder.build(model, torch.float32)
    assert engine is not None, Decoder.why_not
    # prefill logits of the last prompt position, row by row against the unpadded transformers forward
    width = ids.shape[1]
    total = width + 4
    cache = [torch.zeros(3, 2, total, engine.head_dim) for _ in engine.layers]
    cache_v = [torch.zeros_like(c) for c in cache]
    positions = (torch.arange(total).unsqueeze(0) - (mask == 0).sum(1, keepdim=True)).clamp(min=0)
    cos, sin = engine._rotary(positions)
    causal = torch.ones(width, width, dtype=torch.bool).tril().unsqueeze(0) & mask.bool()[:, None, :]
    causal = causal | torch.eye(width, dtype=torch.bool)
    with torch.inference_mode():
        got = engine._forward(ids, 0, cos[:, :width], sin[:, :width], causal.unsqueeze(1), cache, cache_v)
        for row in range(3):
            real = ids[row, mask[row].bool()].unsqueeze(0)
            want = model(input_ids=real).logits[0, -1]
            torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        assert torch.equal(decode(model, ids, mask, max_new_tokens=16, stop_ids=[1], pad_id=0, dtype=torch.float32),
                           _hf(model, ids, mask, 16, [1]))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_rows_stop_at_their_own_stop_token_and_are_padded_after_it(kind):
    model = _model(kind)
    ids, mask = _prompts()
    with torch.inference_mode():
        rows = _hf(model, ids, mask, 16, [1]).tolist()
        # a token one row emits and no other row does becomes a second stop: rows stop at different steps
        row, at, token = next((r, j, t) for r in range(3) for j, t in enumerate(rows[r])
                              if j >= 1 and t != 1 and t not in sum(rows[:r] + rows[r + 1:], []) + rows[r][:j])
        new = decode(model, ids, mask, max_new_tokens=16, stop_ids=[1, token], pad_id=0, dtype=torch.float32)
        assert torch.equal(new, _hf(model, ids, mask, 16, [1, token]))
    assert new[row, at] == token and (new[row, at + 1:] == 0).all() and new.shape[1] > at + 1


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bf16_logits_stay_within_bf16_tolerance_of_fp32(kind):
    model = _model(kind)
    ids, mask = _prompts()
    seen = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = Decoder.build(model, dtype)
        steps = []
        with torch.inference_mode():
            engine.run(ids, mask, max_new_tokens=8, pick=_Recording(steps), stop_ids=[], pad_id=0)
        seen[dtype] = torch.stack(steps)
    fp32, bf16 = seen[torch.float32], seen[torch.bfloat16]
    # the same first step (same prompts); relative to the logits' scale, bf16's ~3 significant digits
    scale = fp32[0].abs().max()
    assert (bf16[0] - fp32[0]).abs().max() / scale < 3e-2
    assert (bf16[0] - fp32[0]).abs().max() > 0  # bf16 really ran


class _Recording(Greedy):
    def __init__(self, steps):
        self.steps = steps

    def __call__(self, logits):
        self.steps.append(logits.clone())
        return super().__call__(logits)


def test_adapters_merged_disabled_or_live():
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.adapters import merged_adapter

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    model.eval()
    ids, mask = _prompts()
    assert Decoder.build(model, torch.float32) is None and "neither merged nor disabled" in Decoder.why_not
    with torch.inference_mode():
        live = _hf(model, ids, mask, 12, [1])
        assert torch.equal(decode(model, ids, mask, max_new_tokens=12, stop_ids=[1], pad_id=0), live)  # fallback
        with merged_adapter(model):
            merged = decode(model, ids, mask, max_new_tokens=12, stop_ids=[1], pad_id=0)
        with model.disable_adapter():
            base = decode(model, ids, mask, max_new_tokens=12, stop_ids=[1], pad_id=0)
            want_base = _hf(model, ids, mask, 12, [1])
    assert torch.equal(merged, live)
    assert torch.equal(base, want_base) and not torch.equal(base, merged)


def test_each_adapter_of_a_shared_base_decodes_as_itself():
    """The pool's case: adapters switched on one base, each merged through ``.data`` (no version
    counter moves) — every build copies the weights as they are at that moment."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.models.adapters import merged_adapter

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    ids, mask = _prompts()
    got, want = {}, {}
    with torch.inference_mode():
        for name in ("a", "b", "a"):
            model.set_adapter(name)
            want[name] = _hf(model, ids, mask, 10, [1])
            with merged_adapter(model):
                got[name] = decode(model, ids, mask, max_new_tokens=10, stop_ids=[1], pad_id=0)
            assert torch.equal(got[name], want[name]), name
    assert not torch.equal(got["a"], got["b"])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = _model("llama")
    ids, mask = _prompts()

    def draw(seed, **kw):
        torch.manual_seed(seed)
        return decode(model, ids, mask, max_new_tokens=10, stop_ids=[], pad_id=0, **kw)

    with torch.inference_mode():
        a, b, c = draw(0, temperature=1.0), draw(0, temperature=1.0), draw(1, temperature=1.0)
        greedy = decode(model, ids, mask, max_new_tokens=10, stop_ids=[], pad_id=0)
        tiny_nucleus = draw(3, temperature=1.0, top_p=1e-6)  # only the most likely token is left
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(tiny_nucleus, greedy)
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    probs = logits.softmax(-1)[0]
    kept = set()
    torch.manual_seed(0)
    for _ in range(400):
        kept.add(int(Sample(1.0, top_p=float(probs[0] + probs[1] / 2))(logits)))
    assert kept == {0, 1}  # the smallest set reaching top_p: tokens 0 and 1, never 2 or 3


def test_unsupported_architectures_fall_back_to_transformers_generate():
    model = _model("gemma")
    ids, mask = _prompts()
    assert Decoder.build(model, torch.float32) is None and "gemma" in Decoder.why_not
    assert isinstance(decoder_for(model, torch.float32), TransformersDecode)
    with torch.inference_mode():
        got = decode(model, ids, mask, max_new_tokens=8, stop_ids=[1], pad_id=0)
        streamed: list[int] = []
        again = decode(model, ids[:1], mask[:1], max_new_tokens=8, stop_ids=[1], pad_id=0,
                       on_token=lambda t: streamed.extend(t.tolist()))
    assert torch.equal(got, _hf(model, ids, mask, 8, [1]))
    assert streamed == again[0].tolist()


def test_on_token_sees_every_new_token_in_order():
    model = _model("qwen2")
    ids, mask = _prompts(lengths=(5,))
    seen: list[int] = []
    with torch.inference_mode():
        new = decode(model, ids, mask, max_new_tokens=9, stop_ids=[], pad_id=0, on_token=lambda t: seen.extend(t.tolist()))
    assert seen == new[0].tolist() and len(seen) == 9


def test_inference_dtype_names():
    assert inference_dtype("fp32") == torch.float32 and inference_dtype("bf16") == torch.bfloat16
    assert inference_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="give one of auto, fp32, bf16"):
        inference_dtype("fp8")


def test_a_copy_that_would_not_fit_keeps_transformers_generate(monkeypatch):
    import tunesmith.hardware as hardware

    model = _model("llama")
    monkeypatch.setattr(hardware, "available_memory_gib", lambda: 1e-6)
    assert Decoder.build(model, torch.float32) is None and "GiB available" in Decoder.why_not
    ids, mask = _prompts()
    with torch.inference_mode():
        assert torch.equal(decode(model, ids, mask, max_new_tokens=6, stop_ids=[1], pad_id=0),
                           _hf(model, ids, mask, 6, [1]))


def test_a_sliding_window_in_reach_keeps_transformers_generate():
    # Mistral slides on every layer whatever layer_types says; 11 prompt + 10 new tokens pass a window of 8
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                               sliding_window=8, layer_types=["full_attention"] * 2)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    engine = Decoder.build(model, torch.float32)
    assert engine is not None and engine.sliding == 8
    ids, mask = _prompts()
    with torch.inference_mode():
        assert torch.equal(engine.generate(ids, mask, max_new_tokens=10, stop_ids=[], pad_id=0),
                           _hf(model, ids, mask, 10, None).clone())


def test_merged_then_disabled_adapters_and_step_dependent_rope_are_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                       init_lora_weights=False))
    model.merge_adapter()
    with model.disable_adapter():  # PEFT's forward unmerges here; the base weights still hold the delta
        assert Decoder.build(model, torch.float32) is None
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert Decoder.build(AutoModelForCausalLM.from_config(config), torch.float32) is None
    assert "dynamic" in Decoder.why_not


def test_the_fallback_ignores_a_models_shipped_generation_defaults():
    """A shipped repetition_penalty / top_k must not change tunesmith's greedy output on either path."""
    model = _model("llama")
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 2
    model.generation_config.no_repeat_ngram_size = 1
    ids, mask = _prompts()
    with torch.inference_mode():
        fallback = TransformersDecode(model, torch.float32).generate(ids, mask, max_new_tokens=12, stop_ids=[1],
                                                                     pad_id=0)
        engine = Decoder.build(model, torch.float32).generate(ids, mask, max_new_tokens=12, stop_ids=[1], pad_id=0)
    assert torch.equal(fallback, engine)
