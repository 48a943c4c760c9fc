"""`tierlm serve`: an OpenAI-compatible HTTP server over `tierlm.LLM`, and the planner as `/v1/plan` and a page at `/`.

Needs the `serve` extra (`pip install "tierlm[serve]"`: fastapi, uvicorn, jinja2). Importing this
package imports nothing heavy; `create_app` (fastapi) loads on first use, and takes an engine you
built (`llm=None` serves the planner alone, without torch).
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(f"module 'tierlm.serve' has no attribute {name!r}")
