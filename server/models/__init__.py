"""Loaded models and how they run. ``manager`` holds the :class:`~server.models.manager.ModelManager`, which
loads, swaps and unloads versions and reports their states; ``loader`` builds one version (convert, optimize,
sessions, batcher) on a daemon thread (``threads``); ``placement`` decides where its instances run and with how
many threads; ``version`` is the served :class:`~server.models.version.ModelVersion`; ``batching`` is the
per-version dynamic batcher whose worker threads run the instances; ``stats`` its Triton-shaped statistics.

The batcher and its statistics live here rather than in a scheduling package of their own: a batcher is one
part of a served version (built by the loader from the version's config and instances, owned and closed by the
version), and the statistics are written by the batcher and the data plane's call on that version."""
