"""tunesmith: from a raw instruction dataset to a tuned, evaluated, shippable model."""

__version__ = "0.1.0"
