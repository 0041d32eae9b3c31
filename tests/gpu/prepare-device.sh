#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what the GPU checks need on the lent H200 machine besides onnxruntime-gpu
# (that is ../shared/gpu/prepare-ort-gpu.sh): the server's Python dependencies that machine lacks, as Python 3.12
# wheels pinned to the versions tested here, and perf_analyzer with the two libraries it loads (libb64,
# libcudart.so.12). The machine reaches no registry, so everything is carried, under .whl/ (git-ignored).
# Usage, from the project root, after `make test` built .venv:  tests/gpu/prepare-device.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
py=.venv/bin/python
rm -rf .whl/deps .whl/bin .whl/lib
mkdir -p .whl/deps .whl/bin .whl/lib

# Missing there (fastapi & co.), or carried to get one consistent gRPC/protobuf set with tritonclient's gencode.
names=(fastapi starlette opentelemetry-api pydantic pydantic-core pydantic-settings python-dotenv typing-inspection
  typing-extensions annotated-types uvicorn orjson python-multipart grpcio grpcio-health-checking protobuf
  tritonclient python-rapidjson)
mapfile -t specs < <("$py" - "${names[@]}" <<'PY'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
    print(f"{name}=={metadata.version(name)}")
PY
)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl/deps "${specs[@]}"

# perf_analyzer (bench/install-perf-analyzer.sh put it in .venv) and the libraries it links.
cp .venv/bin/perf_analyzer.bin .whl/bin/perf_analyzer
cp "$(ldconfig -p | awk '/libb64.so.0d /{print $NF; exit}')" .whl/lib/
cp .venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12 .whl/lib/
du -sh .whl/deps .whl/bin .whl/lib
cat <<'MSG'
Device run (after prepare-ort-gpu.sh's four calls installed onnxruntime-gpu into .whl/site, while the machine is
still warm), one call with carry [".whl/deps", ".whl/bin", ".whl/lib"], timeout_s 540:
  set -o pipefail; chmod +x .whl/bin/perf_analyzer; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/deps/*.whl && export PYTHONPATH=$PWD/.whl/site:/tmp/site:$PWD PYTHONUNBUFFERED=1 \
  PERF_ANALYZER=$PWD/.whl/bin/perf_analyzer LD_LIBRARY_PATH=$PWD/.whl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} && \
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu tests/unit/test_gpu_placement.py tests/unit/test_gpu_graphs_pinned.py \
  tests/unit/test_gpu_metrics.py tests/unit/test_gpu_imports.py tests/unit/test_bench_gpu.py \
  tests/unit/test_batch_policy.py 2>&1 | tee $OUT/gpu-tests.log; timeout 330 python3 -m bench.gpu --quick 2>&1 \
  | tee $OUT/bench.log
Results come back in $OUT: gpu-tests.log, bench.log, results.md, results.json, server.log (5 of the 8 files).
MSG
