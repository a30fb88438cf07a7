"""OpenAI-compatible HTTP serving of the early-exit engine (FastAPI + uvicorn).

``exitwise.server.app.create_app(engine)`` builds the app; importing this package alone does not
import FastAPI, so the CLI stays fast and works without the ``server`` extra.
"""

# Defaults shared by create_app and `exitwise serve` (plain numbers: no import cost for the CLI).
DEFAULT_MAX_BODY_BYTES = 8 << 20  # 8 MiB: ~2M characters of prompt, far past any context served here
DEFAULT_MAX_QUEUE = 64  # requests waiting for a slot in the running batch
