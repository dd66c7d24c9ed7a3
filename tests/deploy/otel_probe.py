"""Run with an image's own Python: an OTLP/gRPC receiver (opentelemetry-proto's service, which the exporter
brings) on the container's loopback; the server's Tracing built from settings as `serve` builds it, one session
span exported to the receiver; the OTLP/HTTP exporter builds too; and the installed versions of the otel extra.

Run by tests/deploy/test_image.py as ``python3 -c`` inside a container (argv[1]: the otel extra's pins, JSON)."""

import importlib.metadata
import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client import CollectorRegistry

from cellserve.server.metrics import Metrics
from cellserve.server.settings import Settings
from cellserve.server.trace_config import build_tracing

spans = []


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        spans.extend(s.name for r in request.resource_spans for ss in r.scope_spans for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(1))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
dropped = Metrics(CollectorRegistry()).trace_spans_dropped
tracing = build_tracing(Settings(otlp_endpoint=f"http://127.0.0.1:{port}"), dropped, {})
tracing.session("pychar", "s1", resumed=False, carrier=None).end(1, "client")
tracing.shutdown()
server.stop(None)
http = build_tracing(Settings(otlp_endpoint="http://127.0.0.1:9", otlp_protocol="http/protobuf"), dropped, {})
http.shutdown()
names = [n.split("==")[0] for n in json.loads(sys.argv[1])]
print(json.dumps({"spans": spans, "versions": {n: importlib.metadata.version(n) for n in names}}))
