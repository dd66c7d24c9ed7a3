"""The bench's same-run baselines: (a) ``echo``, a bare grpc.aio echo of cellserve-sized messages (the
transport ceiling); (b) ``naive``, a stateless unary server the client sends x and the session's whole
state to every step (what a user builds without cellserve); (c) ``ort``, onnxruntime in-process with
every state fed back (the engine ceiling). ``onnx_model`` loads the model from its manifest (either
format, any model of the general contract) for (b) and (c); ``sizes`` gives the wire sizes (a) mirrors."""
