"""The gRPC edge: Triton's GRPCInferenceService (KServe V2 gRPC) and grpc.health.v1, on grpc.aio.

The protocol classes are the ones ``tritonclient`` ships (generated from Triton's own .proto files):
reusing them makes wire compatibility with tritonclient and perf_analyzer hold by construction, and
spares us a hand-kept copy of Triton's large model_config.proto.
"""
