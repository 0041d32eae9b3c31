"""Runtimes that execute models: the lifecycle every backend shares (``base``), the onnxruntime backend with its
CPU and GPU instances (``onnxruntime``), the GPUs this process sees and the CUDA/TensorRT options of a GPU
instance (``gpu``), CUDA graphs (``cuda_graphs``), pinned host buffers (``pinned``) and the lock that keeps CUDA
work out of a graph capture (``capture_lock``). Heavy runtimes are imported lazily inside their modules."""
