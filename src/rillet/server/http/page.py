"""The browser page at ``GET /`` (for ``Accept: text/html``), served from ``static/``.

TGI's clients GET ``/`` as a health check and POST to it, so only a browser's request gets
the page; everything it needs (HTML, CSS, one script) comes from this server, nothing from
a CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from rillet.server.http import tgi

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def root(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")
    return await tgi.health(request)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
