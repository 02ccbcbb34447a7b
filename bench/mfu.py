"""Model FLOPs of a measured window, and the matmul peak they are divided by.

Counted per *real* (non-padding) token t of a sequence of real length T, for a Llama-style
decoder with L layers, width d, heads h x head dim k, KV heads g, MLP width f, vocab V:

    N_body = L * (d*h*k + 2*d*g*k + h*k*d + 3*d*f)        q, k, v, o + gate, up, down
    N_head = d * V                                        LM head (tied or not)
    N_lora = sum over adapted linears of r * (in + out)   (LoRA only)

    full fine-tuning, per real token:   6*N_body + 12*L*T*d        (+ per trained token 6*N_head)
    LoRA, per real token:               4*N_body + 6*N_lora + 12*L*T*d  (+ per trained token 4*N_head)
    reference forward (DPO, no grad):   2*N_body + 4*L*T*d         (+ per trained token 2*N_head)

- 6N = forward 2N + backward 4N (gradients of activations and weights); with LoRA the
  frozen weights need no weight gradient, so 4N (+ the adapters' own 6*N_lora, ~1%).
- Attention (QK^T and AV, no weights): 4*L*T*d per token forward, x3 with backward —
  PaLM's convention (appendix B): the full T, no discount for the causal mask.
- The LM head is needed only where a label is predicted (trained tokens); a runner that
  computes logits at every position does more work than counted and shows lower MFU.
- Only the model's own FLOPs: recomputation by gradient checkpointing, the embedding
  lookup, norms, softmax and the optimizer are not counted (Chowdhery et al. 2022).

MFU = model FLOPs / measured seconds / peak, where peak is the best of a few
``torch.mm`` of 2048x2048 matrices in the runner's compute dtype (fp32, or bf16 under
bf16 autocast) on the same threads, measured in the same `python -m bench` run.
"""

from __future__ import annotations

import time


def param_counts(config, lora_r: int | None = None) -> dict:
    """Matmul parameter counts from a transformers Llama-style config."""
    d, L = config.hidden_size, config.num_hidden_layers
    h = config.num_attention_heads
    k = getattr(config, "head_dim", None) or d // h
    g = getattr(config, "num_key_value_heads", None) or h
    f = config.intermediate_size
    linears = [(d, h * k), (d, g * k), (d, g * k), (h * k, d), (d, f), (d, f), (f, d)]  # (in, out) per layer
    body = L * sum(i * o for i, o in linears)
    lora = L * sum(lora_r * (i + o) for i, o in linears) if lora_r else 0
    return {"layers": L, "hidden": d, "body": body, "head": d * config.vocab_size, "lora": lora}


def window_flops(counts: dict, w: dict, *, lora: bool) -> float:
    """Model FLOPs of a measured window ``w`` (bench.measure.Recorder.window())."""
    L, d = counts["layers"], counts["hidden"]
    k = 4 if lora else 6
    policy = (w["tokens"] * (k * counts["body"] + (6 * counts["lora"] if lora else 0))
              + 12 * L * d * w["sq_lengths"] + w["trained_tokens"] * k * counts["head"])
    reference = (w["ref_tokens"] * 2 * counts["body"] + 4 * L * d * w["ref_sq_lengths"]
                 + w["ref_trained_tokens"] * 2 * counts["head"])
    return float(policy + reference)


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n ``torch.mm`` over ``repeats`` runs (after one warm-up)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
