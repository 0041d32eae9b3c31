"""Runtimes that execute models. Heavy runtimes are imported lazily inside their modules."""
