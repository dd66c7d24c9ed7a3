"""The bench's same-run baselines: (a) ``echo``, a bare grpc.aio echo of cellserve-sized messages (the
transport ceiling); (b) ``naive``, a stateless unary server the client sends x, h, c to (what a user
builds without cellserve); (c) ``ort``, onnxruntime in-process (the engine ceiling). ``onnx_model``
loads the exported model for (b) and (c); ``sizes`` gives the wire sizes (a) mirrors."""
