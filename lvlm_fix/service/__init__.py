"""lvlm_fix.service: the OpenAI-compatible REST API (FastAPI app, Ray Serve deployment, client).

Importing this package loads neither FastAPI nor Ray: only the HTTP clients.
"""

from lvlm_fix.service.client import AsyncClient, Client, ServiceError

__all__ = ["AsyncClient", "Client", "ServiceError"]
