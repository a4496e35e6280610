"""rillet's front doors over one generation service.

``service.py`` is the door-neutral recipe (admission, limits, auth, metrics, and a
generation run on a task that returns its permit); ``dialects/`` map each API's bodies to
it and its results to frames. The doors:

* ``http/``: the HTTP door, with TGI's routes, OpenAI's (``/v1``), plain text
  (``POST /?prompt=``), Triton's HTTP ``generate`` / ``generate_stream`` with KServe v2
  health and metadata (``/v2``), resumable streams (``/streams/<sid>``) and the browser
  page (``GET /``);
* ``ws.py``: WebSocket, the tutorial's chat at ``/`` and the multiplexed ``/ws``, mounted
  on the same app;
* ``grpc_server.py``: Triton's gRPC service (KServe v2: ``ModelStreamInfer``,
  ``ModelInfer``, health and metadata) on a port of its own (8001 by default).

``create_app(engine, ServerConfig(...))`` builds the ASGI app (every door but gRPC);
``rillet serve`` runs it and starts the gRPC door beside it.
"""

from rillet.server.config import ServerConfig
from rillet.server.http.app import create_app

__all__ = ["ServerConfig", "create_app"]
