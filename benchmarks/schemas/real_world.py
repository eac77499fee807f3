"""JSON schemas of real-world shapes, written for Soberana's structured-output benchmarks:
nested objects, enums, arrays, anyOf, string formats and patterns, numeric bounds.

`schemas()` gives 120: twelve shapes, each in ten variants (field names, sizes, bounds).
"""

from __future__ import annotations

_COUNTRIES = ["ES", "FR", "DE", "IT", "PT", "NL", "BE", "AT", "CH", "PL", "SE", "NO"]


def _address(v: int) -> dict:
    return {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 40 + v},
        "city": {"type": "string"},
        "postal_code": {"type": "string", "pattern": r"^[0-9]{" + str(4 + v % 3) + "}$"},
        "country": {"enum": _COUNTRIES[: 4 + v]}},
        "required": ["street", "city", "country"], "additionalProperties": False}


def _person(v: int) -> dict:
    return {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 60},
        "email": {"type": "string", "format": "email"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120 + v},
        "address": _address(v),
        "phones": {"type": "array", "items": {"type": "string", "pattern": r"^\+?[0-9 ]{6,15}$"},
                   "maxItems": 1 + v % 4}},
        "required": ["name", "email"], "additionalProperties": False}


def _invoice(v: int) -> dict:
    line = {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": r"^[A-Z]{3}-[0-9]{" + str(3 + v % 4) + "}$"},
        "quantity": {"type": "integer", "minimum": 1},
        "unit_price": {"type": "number", "minimum": 0},
        "tax": {"enum": [0, 4, 10, 21][: 2 + v % 3]}},
        "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}
    return {"type": "object", "properties": {
        "invoice_id": {"type": "string", "format": "uuid"},
        "issued": {"type": "string", "format": "date"},
        "customer": _person(v),
        "lines": {"type": "array", "items": line, "minItems": 1, "maxItems": 5 + v},
        "currency": {"enum": ["EUR", "USD", "GBP", "CHF"]},
        "paid": {"type": "boolean"}},
        "required": ["invoice_id", "issued", "lines", "currency"], "additionalProperties": False}


def _tool_call(v: int) -> dict:
    tools = []
    for t in range(2 + v % 5):
        tools.append({"type": "object", "properties": {
            "name": {"const": f"tool_{t}"},
            "arguments": {"type": "object", "properties": {
                f"arg_{a}": ({"type": "string"} if a % 2 else {"type": "integer"})
                for a in range(1 + (t + v) % 4)}, "additionalProperties": False}},
            "required": ["name", "arguments"], "additionalProperties": False})
    return {"type": "array", "items": {"anyOf": tools}, "minItems": 1, "maxItems": 1 + v % 3}


def _event(v: int) -> dict:
    return {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 80},
        "starts": {"type": "string", "format": "date-time"},
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"},
                      "maxItems": 3 + v},
        "location": {"anyOf": [_address(v), {"type": "string", "format": "uri"}]},
        "recurrence": {"enum": ["none", "daily", "weekly", "monthly"]}},
        "required": ["title", "starts"], "additionalProperties": False}


def _classification(v: int) -> dict:
    labels = [f"label_{i}" for i in range(3 + 4 * v)]
    return {"type": "object", "properties": {
        "label": {"enum": labels},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "evidence": {"type": "array", "items": {"type": "string", "maxLength": 120}, "maxItems": 3}},
        "required": ["label", "confidence"], "additionalProperties": False}


def _extraction(v: int) -> dict:
    entity = {"type": "object", "properties": {
        "text": {"type": "string"},
        "type": {"enum": ["PERSON", "ORG", "LOC", "DATE", "MONEY", "PRODUCT"][: 3 + v % 4]},
        "start": {"type": "integer", "minimum": 0},
        "end": {"type": "integer", "minimum": 0}},
        "required": ["text", "type"], "additionalProperties": False}
    return {"type": "object", "properties": {
        "entities": {"type": "array", "items": entity, "maxItems": 10 + v},
        "language": {"type": "string", "pattern": "^[a-z]{2}$"}},
        "required": ["entities"], "additionalProperties": False}


def _config(v: int) -> dict:
    return {"type": "object", "properties": {
        "service": {"type": "string", "pattern": r"^[a-z][a-z0-9-]{2,30}$"},
        "replicas": {"type": "integer", "minimum": 1, "maximum": 64},
        "ports": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 65535},
                  "uniqueItems": True, "maxItems": 2 + v},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "resources": {"type": "object", "properties": {
            "cpu": {"type": "string", "pattern": r"^[0-9]+m?$"},
            "memory": {"type": "string", "pattern": r"^[0-9]+(Mi|Gi)$"}}},
        "healthcheck": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
            "path": {"type": "string"}, "interval_s": {"type": "integer"}}}]}},
        "required": ["service", "replicas"], "additionalProperties": False}


def _tree(v: int) -> dict:
    node: dict = {"type": "object", "properties": {"name": {"type": "string"}},
                  "required": ["name"], "additionalProperties": False}
    for _ in range(2 + v % 4):  # nested children, a few levels deep
        node = {"type": "object", "properties": {
            "name": {"type": "string"}, "children": {"type": "array", "items": node, "maxItems": 4}},
            "required": ["name"], "additionalProperties": False}
    return node


def _product(v: int) -> dict:
    return {"type": "object", "properties": {
        "id": {"type": "string"},
        "title": {"type": "string", "maxLength": 100},
        "price": {"type": "number", "exclusiveMinimum": 0},
        "categories": {"type": "array", "items": {"enum": [f"cat{i}" for i in range(5 + v)]},
                       "maxItems": 3},
        "variants": {"type": "array", "items": {"type": "object", "properties": {
            "color": {"enum": ["red", "green", "blue", "black", "white"]},
            "size": {"enum": ["XS", "S", "M", "L", "XL"]},
            "stock": {"type": "integer", "minimum": 0}}, "required": ["stock"]}},
        "rating": {"anyOf": [{"type": "number", "minimum": 1, "maximum": 5}, {"type": "null"}]}},
        "required": ["id", "title", "price"], "additionalProperties": False}


def _answer(v: int) -> dict:
    return {"type": "object", "properties": {
        "reasoning": {"type": "string", "maxLength": 400 + 50 * v},
        "answer": {"anyOf": [{"type": "number"}, {"type": "string", "maxLength": 50},
                             {"type": "boolean"}]},
        "sources": {"type": "array", "items": {"type": "object", "properties": {
            "url": {"type": "string", "format": "uri"}, "quote": {"type": "string"}},
            "required": ["url"]}, "maxItems": 4}},
        "required": ["reasoning", "answer"], "additionalProperties": False}


def _wide(v: int) -> dict:
    n = 10 + 6 * v
    kinds = [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"},
             {"enum": ["a", "b", "c"]}]
    return {"type": "object",
            "properties": {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(n)},
            "required": [f"field_{i:02d}" for i in range(0, n, 2)],
            "additionalProperties": False}


SHAPES = [_address, _person, _invoice, _tool_call, _event, _classification, _extraction,
          _config, _tree, _product, _answer, _wide]


def schemas() -> list[tuple[str, dict]]:
    """(name, schema) for every shape and variant."""
    return [(f"{shape.__name__.strip('_')}_{v}", shape(v)) for shape in SHAPES for v in range(10)]
