"""Inference: load whatever a user points at (``load``: one resolver for runs, exports,
adapters and base models), share one base among several adapters (``pool``), generate
(``generate``) and score with a reward model (``score``).

Kept free of imports so that the CLI reads the default below without loading torch.
"""

# Prompts decoded (or sequences scored) together, by default everywhere: eval, compare, generate,
# pipeline compare stages. SmolLM2 fp32 greedy through transformers' generate: 84 new tokens/s at 8, 123 at 16,
# 161 at 32 (tunesmith's decode loop in bf16: ~300 at 16, infer/decode.py).
GENERATION_BATCH = 16

# Decoding precision choices (infer.decode.inference_dtype); auto = bf16 weights where native.
DTYPES = ("auto", "fp32", "bf16")
DTYPE_HELP = "decoding precision: auto (bf16 weights where the hardware has native bf16, else fp32), fp32 or bf16"
