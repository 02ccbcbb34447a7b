"""The data layer: readers → formats → validate → tokenize → batches.

It knows nothing of training, evaluation or the CLI.
"""
