"""The Open Inference Protocol (Triton flavour) served beside the native API, over the same sessions.

- ``servicer``: the ``GRPCInferenceService`` handlers and their registration (under Triton's name too);
- ``metadata``: how a model looks to Triton clients (``ModelMetadata``, ``ModelConfig``);
- ``inputs``: a request's tensors checked against the model (names, dtypes, shapes, reply size);
- ``tensors``: OIP tensors and parameters ↔ numpy and Python values;
- ``sequences``: sequence ids and start/end flags from request parameters;
- ``stream``: one ``ModelStreamInfer`` stream (sequences scoped to it).

Every handler works through the server's :class:`~cellserve.server.dataplane.DataPlane`: a sequence is one of
its sessions, and ``ModelInfer`` with explicit state (h0/c0 in, hn/cn out) is its stateless ``infer``.

Shape convention (Triton's ``max_batch_size > 0`` form: every tensor starts with a batch dimension
that the config's ``dims`` leave out):

- ``x``: ``[B, T, *frame]`` for a model with a time axis (``T`` ≥ 1 steps per request), ``[B, *frame]``
  for a per-frame model (one frame per request); its datatype is the model's (INT64 token ids, FP32, FP16).
- ``y``: ``[B, T, *out]`` or ``[B, *out]``, as the graph gives it.
- A sequence request (one with a ``sequence_id``) has ``B = 1``, like every request Triton's
  sequence batcher takes; it sends ``x`` only and gets ``y`` back (the next states too if it asks
  for them by name).
- Extension, stateless (no ``sequence_id``): every state tensor may be sent and asked for explicitly,
  ``[B, *state]`` batch first (the graph's own batch axis removed; zeros if absent). The config's
  ``parameters`` name them (``explicit_state_inputs``, ``explicit_state_outputs``).

Tensor names are the manifest's (the graph's); state pairs come from the manifest, never from names.
"""
