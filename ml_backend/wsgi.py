"""gunicorn entry point: ``gunicorn -c python:ml_backend.gunicorn_conf ml_backend.wsgi:app``.

Use that config (it binds ``$PORT`` and lets the master own the embedded Redis when REDIS_URL is unset).

``python -m ml_backend.wsgi`` runs Flask's development server on ``PORT`` instead (local use only).
"""

from __future__ import annotations

import logging

from ml_backend.app import create_app
from ml_backend.settings import get_settings

settings = get_settings()
logging.basicConfig(
    level=settings.log_level.upper(),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
app = create_app(settings, queue=settings.use_queue)

if __name__ == "__main__":
    app.run(host="0.0.0.0", port=settings.port)
