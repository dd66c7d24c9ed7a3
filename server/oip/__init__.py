"""The Open Inference Protocol (Triton flavour) served beside the native API, over the same sessions.

- ``servicer``: the ``GRPCInferenceService`` handlers and their registration (under Triton's name too);
- ``metadata``: how a model looks to Triton clients (``ModelMetadata``, ``ModelConfig``);
- ``inputs``: a request's tensors checked against the model (names, dtypes, shapes, reply size);
- ``tensors``: OIP tensors and parameters ↔ numpy and Python values;
- ``sequences``: sequence ids and start/end flags from request parameters;
- ``stream``: one ``ModelStreamInfer`` stream (sequences scoped to it);
- ``stateless``: ``ModelInfer`` with explicit state (h0/c0 in, hn/cn out).

Shape convention (Triton's ``max_batch_size > 0`` form: every tensor starts with a batch dimension
that the config's ``dims`` leave out):

- ``x``: ``[B, T]`` token ids (INT64) or ``[B, T, I]`` features (FP32); ``T`` ≥ 1 steps per request.
- ``y``: ``[B, T, O]`` FP32.
- A sequence request (one with a ``sequence_id``) has ``B = 1``, like every request Triton's
  sequence batcher takes; it sends ``x`` only and gets ``y`` back (``hn``/``cn`` too if it asks for
  them by name).
- Extension, stateless (no ``sequence_id``): the state tensors may be sent and asked for explicitly:
  ``h0``, ``c0`` inputs (zeros if absent) and ``hn``, ``cn`` outputs, ``[B, L, H]`` FP32, batch first;
  row ``b`` is ``h[:, b, :]`` of the ONNX graph's ``[L, B, H]``. The config's ``parameters`` name them
  (``explicit_state_inputs``, ``explicit_state_outputs``).

Tensor names are the manifest's (the graph's), paired with their meaning by manifest role
(:attr:`cellserve.model.manifest.Manifest.names`).
"""
