"""``tunesmith env`` and ``tunesmith models``."""
