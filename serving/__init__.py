"""The gRPC serving layer: validation, history, encoders, retrieval, re-ranking, server.

Nothing in the project imports ``serving``; it imports ``towers`` and ``indexing``.
Generated protobuf stubs live in ``serving/_generated`` (``python -m serving.gen_protos``).
"""
