"""The CPU install must never need a GPU package: with every GPU module blocked (``sys.modules[name] = None``
makes its import fail), the server, the optimizer and the GPU placement code still import, and the CPU code
paths that could touch them (GPU count, GPU metrics, device probe) answer without them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT

BLOCKED = ("pynvml", "tensorrt", "tensorrt_libs", "tensorrt_bindings", "cuda", "cupy", "pycuda", "nvidia", "torch")

SCRIPT = textwrap.dedent(
    """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None
    import server.app, server.cli, server.models.loader, server.models.placement, server.backends.gpu, server.metrics
    import optimizers, optimizers.cli, optimizers.passes
    from server.backends.gpu import visible_gpu_count
    from server.metrics import gpu_families
    from optimizers import probe_device
    import onnxruntime
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert visible_gpu_count({{}}) == (1 if cuda else 0), "without NVML: 1 GPU with onnxruntime-gpu, else none"
    assert gpu_families() == []
    probe_device()  # falls back to nvidia-smi for the GPU list
    loaded = sorted(n for n in {blocked!r} if sys.modules.get(n) is not None)
    assert not loaded, loaded
    print("ok")
    """
)


def test_cpu_code_imports_with_gpu_modules_blocked() -> None:
    code = SCRIPT.format(blocked=BLOCKED)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
