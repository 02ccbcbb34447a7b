"""Evaluation: generation, suites (instruction following, refusal, domain accuracy, loss),
comparison of several models on the same prompts, and the report."""

# Prompts decoded (or sequences scored) together, by default everywhere: eval, compare, generate,
# pipeline compare stages. SmolLM2 fp32 greedy here: 84 new tokens/s at 8, 123 at 16, 161 at 32.
GENERATION_BATCH = 16

