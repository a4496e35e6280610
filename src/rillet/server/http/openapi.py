"""The OpenAPI document (``/openapi.json``, ``/docs``): FastAPI's, plus the request bodies.

Routes read their bodies themselves (``body.py``: the size limit, the nesting depth, errors
in the route's own format), so FastAPI cannot see them. Each route declares its body with
:func:`json_body`, and :func:`install` moves the models' shared definitions into the
document's components, where their ``$ref``\\ s point.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def json_body(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    """A route's ``openapi_extra``: a required JSON body shaped as ``model`` (a pydantic
    model, or a JSON Schema for free-form bodies)."""
    schema = model if isinstance(model, dict) else model.model_json_schema(ref_template=_REF)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install(app: FastAPI) -> None:
    """Serve the document with every body's definitions in ``components.schemas``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for operations in document["paths"].values():
                for operation in operations.values():
                    content = operation.get("requestBody", {}).get("content", {})
                    body = content.get("application/json", {}).get("schema", {})
                    schemas.update(body.pop("$defs", {}))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
