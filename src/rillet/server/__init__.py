"""rillet's front doors over one generation service.

``service.py`` is the door-neutral recipe (admission, limits, auth, stream/collect,
metrics); ``dialects/`` map each API's bodies to it; ``http/`` is the HTTP door (TGI,
OpenAI, plain text). ``create_app(engine, ServerConfig(...))`` builds the ASGI app and
``rillet serve`` runs it.
"""

from rillet.server.config import ServerConfig
from rillet.server.http.app import create_app

__all__ = ["ServerConfig", "create_app"]
