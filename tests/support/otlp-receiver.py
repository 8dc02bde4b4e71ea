"""An OTLP receiver for the tests, decoding with the official OpenTelemetry
protobuf definitions (PyPI opentelemetry-proto), not respawn's own types.

Over HTTP (the default) it serves POST /v1/traces and /v1/metrics
(application/x-protobuf) on 127.0.0.1:PORT; with --grpc, the OTLP gRPC services
(TraceService/Export, MetricsService/Export) instead, on the same port.

It appends every span it receives to FILE, one JSON object per line:
{service, resource, name, kind, trace_id, span_id, parent_span_id, attributes,
links}; and every metric data point to METRICS, one per line: {service,
instance, name, unit, type (sum, gauge, histogram), attributes, value | count and
sum, time}.

usage: python otlp-receiver.py PORT FILE [METRICS] [--grpc]
"""
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

GRPC = "--grpc" in sys.argv
ARGS = [a for a in sys.argv[1:] if a != "--grpc"]
PORT, OUT = int(ARGS[0]), ARGS[1]
METRICS = ARGS[2] if len(ARGS) > 2 else OUT + ".metrics"


# Exports arrive on several threads at once: each batch is one write, under the
# lock, so that no line is interleaved with another.
LOCK = threading.Lock()


def append(path, lines):
    if lines:
        with LOCK, open(path, "a") as out:
            out.write("".join(lines))


def value(v):
    d = MessageToDict(v)
    return next(iter(d.values()), None)


def write_spans(req):
    lines = []
    for rs in req.resource_spans:
        attrs = {a.key: value(a.value) for a in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                lines.append(json.dumps({
                    "service": attrs.get("service.name"),
                    "resource": attrs,
                    "name": s.name,
                    "kind": s.kind,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "attributes": {a.key: value(a.value) for a in s.attributes},
                    "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in s.links],
                }) + "\n")
    append(OUT, lines)


def write_metrics(req):
    lines = []
    for rm in req.resource_metrics:
        res = {a.key: value(a.value) for a in rm.resource.attributes}
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                for p in getattr(m, kind).data_points:
                    point = {
                        "service": res.get("service.name"),
                        "instance": res.get("service.instance.id"),
                        "name": m.name,
                        "unit": m.unit,
                        "type": kind,
                        "attributes": {a.key: value(a.value) for a in p.attributes},
                        "time": p.time_unix_nano,
                    }
                    if kind == "histogram":
                        point["count"] = p.count
                        point["sum"] = p.sum
                    else:
                        point["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                    lines.append(json.dumps(point) + "\n")
    append(METRICS, lines)


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        kinds = {
            "/v1/traces": (ExportTraceServiceRequest, write_spans, ExportTraceServiceResponse),
            "/v1/metrics": (ExportMetricsServiceRequest, write_metrics, ExportMetricsServiceResponse),
        }
        if self.path not in kinds:
            self.send_response(404)
            self.end_headers()
            return
        if self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(415)
            self.end_headers()
            return
        request, write, response = kinds[self.path]
        req = request()
        req.ParseFromString(body)
        write(req)
        reply = response().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def serve_grpc():
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            write_spans(request)
            return ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            write_metrics(request)
            return ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    server.add_insecure_port(f"127.0.0.1:{PORT}")
    server.start()
    server.wait_for_termination()


if GRPC:
    serve_grpc()
else:
    ThreadingHTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
