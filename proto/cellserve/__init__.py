"""cellserve: stateful LSTM serving over gRPC streams.

Subpackages: ``cellserve.model`` (train, export, reference cell), ``cellserve.server`` (the
serving process), ``cellserve.client`` (SDK, CLI, benchmarks), ``cellserve.v1`` (generated API).
"""

__version__ = "0.1.0"
