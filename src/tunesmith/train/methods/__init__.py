"""One file per method; each = how to build its batch + a pure loss function."""
