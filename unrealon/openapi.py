"""
The OpenAPI 3.1 document of the HTTP server API (PROTOCOL.md section 8),
served at C{GET /api/openapi.json}.

Built from the registry's backend methods -- the catalogue events,
C{publish}, the presence queries, C{connections.disconnect} and whatever the
application registered for L{Caller.BACKEND} -- with the same schema
functions that write the clients' OpenRPC document (L{unrealon.rpc}), so the
document can never describe another API than the one served.
"""

from __future__ import annotations

from typing import Any

from unrealon.rpc import Caller, Registry, object_schema

_JSON = "application/json"

#: the error body every non-200 reply carries
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {
                    "type": "string",
                    "description": "invalid_params, unauthorized, method_not_found, "
                    "method_not_allowed, conflict, payload_too_large, unsupported_media_type, "
                    "forbidden, not_found, internal_error, backend_unavailable",
                },
                "message": {"type": "string"},
                "errors": {
                    "type": "array",
                    "maxItems": 20,
                    "description": "invalid_params only: what is wrong, field by field",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
                "retryable": {
                    "type": "boolean",
                    "description": "true when the same request may succeed later "
                    "(backend_unavailable, conflict)",
                },
            },
        }
    },
}

#: status -> (component name, description, extra response headers)
_ERRORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "400": ("InvalidParams", "The body is not a JSON object, the params are invalid, or "
            "the Idempotency-Key header is not 1-128 printable ASCII characters "
            "(code invalid_params, with errors).", {}),
    "401": ("Unauthorized", "The API key is missing or wrong (code unauthorized).",
            {"WWW-Authenticate": {"schema": {"type": "string", "const": "apikey"}}}),
    "404": ("MethodNotFound", "No such backend method (code method_not_found); "
            "client-only methods are not backend methods.", {}),
    "405": ("MethodNotAllowed", "Not POST (code method_not_allowed).",
            {"Allow": {"schema": {"type": "string", "const": "POST"}}}),
    "409": ("Conflict", "Another request with this Idempotency-Key was still being "
            "handled when this one gave up waiting (code conflict, retryable).", {}),
    "413": ("PayloadTooLarge", "The body is larger than 1 MiB (code payload_too_large).", {}),
    "415": ("UnsupportedMediaType", "The Content-Type is not application/json "
            "(code unsupported_media_type).", {}),
    "500": ("InternalError", "The method failed (code internal_error); never carries "
            "exception text.", {}),
    "503": ("BackendUnavailable", "Redis is unreachable, or the method did not answer "
            "within the API's deadline (code backend_unavailable, retryable: true).", {}),
}


def _error_response(description: str, headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


def _operation(spec: Any) -> dict[str, Any]:
    params = object_schema(spec.params, additional=spec.extra_params)
    result = object_schema(spec.result) if spec.result else {"type": "object"}
    responses: dict[str, Any] = {
        "200": {
            "description": "Handled: the result the ingress stream's reply would carry.",
            "headers": {
                "Idempotent-Replayed": {
                    "description": "true when this is the stored reply of an earlier "
                    "request with the same Idempotency-Key",
                    "schema": {"type": "string", "const": "true"},
                }
            },
            "content": {
                _JSON: {
                    "schema": {
                        "type": "object",
                        "required": ["result"],
                        "properties": {"result": result},
                    }
                }
            },
        }
    }
    for status, (name, _, _) in _ERRORS.items():
        responses[status] = {"$ref": f"#/components/responses/{name}"}
    description = spec.summary or spec.name
    if spec.extra_params:
        description += ". Unknown extra params are kept (in the event's data)."
    return {
        "operationId": spec.name,
        "summary": spec.summary or spec.name,
        "description": description,
        "tags": [spec.name.split(".")[0]],
        "parameters": [{"$ref": "#/components/parameters/IdempotencyKey"}],
        "requestBody": {
            "required": True,
            "description": "The method's params, a JSON object of at most 1 MiB.",
            "content": {_JSON: {"schema": params}},
        },
        "responses": responses,
    }


def openapi_document(registry: Registry, *, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every method the backend may call."""
    paths: dict[str, Any] = {
        "/api/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI document",
                        "content": {_JSON: {"schema": {"type": "object"}}},
                    },
                    "404": {"$ref": "#/components/responses/MethodNotFound"},
                },
            }
        }
    }
    for spec in registry.methods(Caller.BACKEND):
        paths[f"/api/{spec.name}"] = {"post": _operation(spec)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "unrealon-ws backend HTTP API",
            "version": version,
            "description": (
                "The backend methods of PROTOCOL.md section 6 over HTTP (section 8): "
                "POST /api/<method> with the method's params as a JSON object and "
                "'Authorization: apikey <key>'. Off (404) unless UNREALON_API_KEY is set. "
                "A request with an Idempotency-Key that repeats one handled in the last "
                "5 minutes gets the first reply instead of being handled again."
            ),
        },
        "security": [{"apikey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apikey": {
                    "type": "http",
                    "scheme": "apikey",
                    "description": "Authorization: apikey <key>, one of the keys in "
                    "UNREALON_API_KEY (comma-separated, so keys can be rotated)",
                }
            },
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "1-128 printable ASCII characters; a repeat within "
                    "5 minutes (same method, any node) gets the first reply",
                    "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,128}$"},
                }
            },
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {
                name: _error_response(description, headers)
                for name, description, headers in _ERRORS.values()
            },
        },
    }
