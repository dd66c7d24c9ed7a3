"""Model side: torch LSTM, numpy reference cell (the oracle), data, training, ONNX export, manifest.

This package's ``__init__`` imports nothing heavy: the server imports ``manifest`` and
``reference`` from here without torch installed.
"""
