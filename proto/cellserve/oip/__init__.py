"""Generated stubs for the Open Inference Protocol subset cellserve serves (see ``grpc_service.proto``).

The protos here carry the exact field names and numbers of KServe's Open Inference Protocol v2
and of Triton's model configuration, so the wire format is the same as Triton's. The messages
live in proto package ``cellserve.oip`` (not ``inference``) so that they can share a process
with ``tritonclient``: protobuf's default descriptor pool refuses a second definition of any
``inference.*`` symbol. Message names never travel on the gRPC wire; the service is also
registered under Triton's name ``inference.GRPCInferenceService`` (``cellserve.server.oip.servicer``).
"""
