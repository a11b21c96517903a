"""Malformed input to a live server, generated: whatever the body of ``/predict`` or ``/delta``, the
answer is 200 or a 4xx with a message (never a 5xx or a dropped connection), the server keeps
serving, and a refused delta leaves the model as it was."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recmem.serve.limits import Limits
from recmem.serve.service import ModelService, Served
from recmem.serving import load_bundle
from tests.test_serve import serving
from tests.test_serving_bundle import _config

FIELDS = ["I1", "I2", "I3", "C1", "C2", "C3", "C4", "label", "rows", "base_version", "version", "tables",
          "ids", "deleted", "dense", ""]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=6),
    max_leaves=30)
NASTY = [b"", b"{", b"[]", b"null", b'{"rows": NaN}', b'{"rows": [{"I1": Infinity}]}', b"\xff\xfe",
         b"[" * 60_000, b"[" * 100_000, b'{"rows": [{"I1": 1e999}]}', b'{"rows": [{"C1": ' + b"9" * 5000 + b"}]}",
         b'{"rows": [], "rows": 3}', b'{"base_version": "x", "version": "y"}']


@pytest.fixture(scope="module")
def live(tiny_root, tmp_path_factory):
    """(port, service, the served model, a valid row) of a server on a small trained hash model."""
    from recmem.export.job import export_job
    from recmem.train.local import train_local

    cfg = _config(tiny_root, tmp_path_factory.mktemp("fuzz"), "hash", "train.max_steps=2")
    train_local(cfg)
    served = Served(load_bundle(export_job(cfg, None, "fp32")))
    service = ModelService("fuzz", served, Limits(max_body_bytes=64_000, max_rows=64, max_delta_bytes=64_000))
    row = {**{f: 1.5 for f in cfg.data.schema.dense}, **{f: 7 for f in cfg.data.schema.sparse}}
    with serving(service) as port:
        yield port, service, served, row


def _post(port: int, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    return response.status, answer


def _check(live, path: str, body: bytes) -> None:
    port, service, served, row = live
    status, answer = _post(port, path, body)
    assert status == 200 or (400 <= status < 500 and answer["error"]), (status, answer)
    if path == "/delta":
        if status != 200:
            assert service.served is served  # refused: the model is the one before
        service.swap(served)
    assert _post(port, "/predict", json.dumps({"rows": [row]}).encode())[0] == 200  # still serving


def _encode(value) -> bytes:
    return json.dumps(value).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=json_values)
def test_any_json_body(live, body):
    for path in ("/predict", "/delta"):
        _check(live, path, _encode(body))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(["I1", "C2", "nope", "label"]), value=json_values, drop=st.booleans(), rows=st.integers(0, 70))
def test_damaged_rows(live, field, value, drop, rows):
    row = dict(live[3])
    if drop:
        row.pop(field, None)
    else:
        row[field] = value
    _check(live, "/predict", _encode({"rows": [live[3]] * rows + [row]}))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(feature=st.sampled_from(["C1", "C4", "nope"]), ids=json_values, rows=json_values, deleted=json_values,
       dense=st.none() | json_values, good_base=st.booleans())
def test_damaged_deltas(live, feature, ids, rows, deleted, dense, good_base):
    base = live[2].bundle.version if good_base else "other"
    delta = {"base_version": base, "version": "next", "tables": {feature: {"ids": ids, "rows": rows, "deleted": deleted}}}
    if dense is not None:
        delta["dense"] = dense
    _check(live, "/delta", _encode(delta))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300) | st.sampled_from(NASTY))
def test_any_bytes(live, body):
    for path in ("/predict", "/delta"):
        _check(live, path, body)
