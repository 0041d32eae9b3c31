"""The HTTP edge: KServe V2 REST plus Triton's extensions, on FastAPI/uvicorn."""
