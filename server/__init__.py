"""optiserve: a KServe V2 / Triton-compatible model server that optimizes models at load time."""

__version__ = "0.1.0"
