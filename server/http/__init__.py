"""The HTTP edge: KServe V2 REST plus Triton's extensions, on uvicorn.

``fast.InferFastPath`` is the ASGI app uvicorn runs: it answers ``POST .../infer`` itself (the one inference
handler) and passes everything else to the FastAPI app of ``app`` (health, metadata, statistics, repository,
metrics, /docs, where inference has a docs-only entry). Both read bodies with ``body``, decode and encode
tensors with ``codec`` and write replies and errors with ``responses``; ``multipart`` streams uploads into the
data plane's upload sink and ``protocol`` bounds request headers in uvicorn's HTTP protocol.
"""
