"""rillet's HTTP front door: TGI and OpenAI APIs over Server-Sent Events.

``create_app(engine, ServerConfig(...))`` builds the ASGI app; ``rillet serve`` runs it.
"""

from rillet.server.app import create_app
from rillet.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
