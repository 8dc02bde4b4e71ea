"""Schemathesis hooks for scripts/fuzz-api.

1. No request makes the broker call out: `notify` URLs are dropped from every job
   spec and sweep template before it is sent (the fuzz stack would otherwise POST
   state changes to whatever hosts the fuzzer made up).

2. A few rules of the API cannot be written in JSON Schema; the OpenAPI document
   states them in words. For each, a *positive* case (one the fuzzer expects to be
   accepted) is brought within the rule here, changing no more than the rule needs.
   Negative cases are left alone, so the server is still tested for refusing them.

3. YAML bodies are written as YAML 1.2 reads them. Schemathesis dumps YAML with
   PyYAML, which speaks YAML 1.1: it leaves a string like `1e100` unquoted, and a
   YAML 1.2 parser (respawn's) rightly reads that as a number. Every string is
   therefore written double-quoted, which both versions read the same way.
"""

import json

import schemathesis
import yaml
from schemathesis.transport.serialization import serialize_yaml

MAX_JOBS = 10_000
SWEEP_LABELS = ("respawn.array", "respawn.array_index")


def _positive(case):
    meta = case.meta
    return meta is not None and meta.generation.mode.is_positive


def _drop_notify(spec):
    if isinstance(spec, dict):
        spec.pop("notify", None)


def _escape(value):
    """A template value with every `${` written as the literal `$${`."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, list):
        return [_escape(v) for v in value]
    if isinstance(value, dict):
        return {_escape(k): _escape(v) for k, v in value.items()}
    return value


def _text(value):
    """A parameter value as the broker substitutes it (JSON's spelling of numbers)."""
    return value if isinstance(value, str) else json.dumps(value)


def _sweep_rules(body):
    """Rules of POST /v1/arrays no JSON Schema states."""
    template = body.get("template")
    if isinstance(template, dict):
        template = _escape(template)
        body["template"] = template
    grid, entries = body.get("grid"), body.get("list")
    if isinstance(grid, dict):
        names = list(grid)
    elif isinstance(entries, list) and entries and isinstance(entries[0], dict):
        names = list(entries[0])
    else:
        return
    # Parameter names differ in more than case: each sets PARAM_<NAME>.
    seen, keep = set(), []
    for name in names:
        if name.upper() not in seen:
            seen.add(name.upper())
            keep.append(name)
    if isinstance(grid, dict):
        size, new = 1, {}
        for name in keep:
            values, texts = [], set()
            # No value twice (as substituted), and at most MAX_JOBS combinations.
            for v in grid[name]:
                if _text(v) not in texts and size * (len(values) + 1) <= MAX_JOBS:
                    texts.add(_text(v))
                    values.append(v)
            size *= max(len(values), 1)
            new[name] = values
        body["grid"] = new
    else:
        # Every entry has the parameters of the first.
        first = {k: entries[0][k] for k in keep}
        body["list"] = [
            {k: (e[k] if isinstance(e, dict) and k in e else first[k]) for k in keep}
            for e in entries
        ]
    if isinstance(template, dict):
        # The sweep sets PARAM_<NAME> and its labels; the template may not.
        for field, taken in (("env", {f"PARAM_{n.upper()}" for n in keep}), ("labels", SWEEP_LABELS)):
            if isinstance(template.get(field), dict):
                for key in taken:
                    template[field].pop(key, None)


class _QuotedDumper(yaml.SafeDumper):
    pass


_QuotedDumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
)


def yaml_1_2(value):
    if isinstance(value, (dict, list, str)):
        return yaml.dump(value, Dumper=_QuotedDumper, allow_unicode=False).encode()
    return serialize_yaml(value)["data"]


schemathesis.serializer(
    "text/yaml", "text/x-yaml", "text/vnd.yaml", "text/yml", "application/yaml", "application/x-yaml"
)(lambda ctx, value: yaml_1_2(value))


@schemathesis.hook
def before_call(context, case, kwargs):
    path, body = case.operation.path, case.body
    if path == "/v1/jobs" and case.method.upper() == "POST":
        _drop_notify(body)
        if _positive(case) and isinstance(body, dict):
            # Idempotency-Key and the spec's own key must agree when both are given:
            # the header goes when they differ.
            headers = case.headers or {}
            key = body.get("idempotency_key")
            for name in list(headers):
                if name.lower() == "idempotency-key" and key is not None and headers[name] != key:
                    del headers[name]
    elif path == "/v1/arrays" and case.method.upper() == "POST" and isinstance(body, dict):
        _drop_notify(body.get("template"))
        if _positive(case):
            _sweep_rules(body)
