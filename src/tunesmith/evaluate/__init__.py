"""Evaluation: suites (instruction following, refusal, domain accuracy, loss, preference),
the runner that puts several models through them, comparison and the report. Reads run
folders (``run.json``) and exports; loads models through ``tunesmith.infer``."""
