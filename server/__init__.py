"""optiserve: a KServe V2 / Triton-compatible model server that optimizes models at load time.

The top level holds the composition root (``app``), the command line (``cli``, ``__main__``) and what every layer
shares: ``settings``, ``errors``, ``logs``, ``metrics``, ``auth`` and ``dataplane``, the one API both edges call.
The layers are packages: the edges ``http`` and ``rpc``, ``protocol`` (the protocol-neutral request model),
``models`` (loaded models and how they run), ``repository`` (what is on disk), ``backends`` (runtimes) and
``convert`` (framework models to ONNX). README.md, "Architecture", has the map and the path of a request."""

__version__ = "0.1.0"
