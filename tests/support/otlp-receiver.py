"""An OTLP/HTTP receiver for the tests, decoding with the official OpenTelemetry
protobuf definitions (PyPI opentelemetry-proto), not respawn's own types.
Serves POST /v1/traces and /v1/metrics (application/x-protobuf) on
127.0.0.1:PORT. Appends every span it receives to FILE, one JSON object per line:
{service, name, kind, trace_id, span_id, parent_span_id, attributes, links};
and every metric data point to METRICS, one per line: {service, instance, name,
unit, type (sum, gauge, histogram), attributes, value | count and sum, time}.

usage: python otlp-receiver.py PORT FILE [METRICS]
"""
import json
import sys
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

PORT, OUT = int(sys.argv[1]), sys.argv[2]
METRICS = sys.argv[3] if len(sys.argv) > 3 else OUT + ".metrics"


def value(v):
    d = MessageToDict(v)
    return next(iter(d.values()), None)


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path not in ("/v1/traces", "/v1/metrics"):
            self.send_response(404)
            self.end_headers()
            return
        if self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(415)
            self.end_headers()
            return
        if self.path == "/v1/metrics":
            self.metrics(body)
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        with open(OUT, "a") as out:
            for rs in req.resource_spans:
                attrs = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.write(json.dumps({
                            "service": attrs.get("service.name"),
                            "name": s.name,
                            "kind": s.kind,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "attributes": {a.key: value(a.value) for a in s.attributes},
                            "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()} for l in s.links],
                        }) + "\n")
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def metrics(self, body):
        req = ExportMetricsServiceRequest()
        req.ParseFromString(body)
        with open(METRICS, "a") as out:
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
                            out.write(json.dumps(point) + "\n")
        reply = ExportMetricsServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", PORT), Receiver).serve_forever()
