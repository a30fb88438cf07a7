"""OpenAI-compatible HTTP serving of the early-exit engine (FastAPI + uvicorn).

``exitwise.server.app.create_app(engine)`` builds the app; importing this package alone does not
import FastAPI, so the CLI stays fast and works without the ``server`` extra.
"""
