"""Evaluation: generation, suites (instruction following, refusal, domain accuracy, loss),
comparison of several models on the same prompts, and the report."""
