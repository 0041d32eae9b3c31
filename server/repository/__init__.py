"""The model repository on disk: its Triton layout and the path checks that keep every file under the root
(``layout``), model configs in Triton's schema and their completion from the ONNX graph (``config``), our
``optimize { ... }`` extension block (``optimize_block``), the checks on a version's model files before any
runtime reads them (``modelfile``), and uploads staged, validated and published atomically (``upload``)."""
