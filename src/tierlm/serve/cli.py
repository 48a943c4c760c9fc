"""The `tierlm serve` command (registered on `tierlm.cli.app`). Heavy imports happen inside it."""

from __future__ import annotations

from typing import Optional

import typer

from ..cli import (CACHE_DIR, CACHE_TTL, DISK_CACHE, HOST_CACHE, KV_TIERS, REMOTE_CACHE, TIER_POLICY, TIER_WRITE, _fail,
                   _tier_options, err)
from ..errors import TierlmError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    model: Optional[str] = typer.Argument(None, help="Checkpoint directory (config.json + safetensors, "
                                          "tokenizer.json for text)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TIERLM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/* (or $TIERLM_API_KEY)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model name clients send (default: MODEL as given)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait beyond --max-num-seqs "
                                  "running ones; more get 429."),
    max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit",
                                                   help="Largest max_tokens a request may ask (default: max model len)."),
    max_request_bytes: str = typer.Option("1MiB", "--max-request-bytes", help="Largest request body (413 beyond)."),
    shutdown_grace: float = typer.Option(30.0, "--shutdown-grace", help="Seconds running requests may take to "
                                         "finish on SIGTERM before they end with an error."),
    planner_only: bool = typer.Option(False, "--planner-only", help="Serve the planner only (the page at / and "
                                      "/v1/plan): no model, no torch."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32 | fp64 (default: the checkpoint's)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cpu)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Sequences the engine runs at once."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU compute threads of the engine (default: "
                                          "$OMP_NUM_THREADS if set, else all cores but one, left to HTTP)."),
    kv_dtype: str = typer.Option("auto", "--kv-dtype", help="auto (the model dtype) | bf16 | fp8"),
    cache_dir: Optional[str] = CACHE_DIR,
    kv_tiers: Optional[str] = KV_TIERS,
    host_cache: Optional[str] = HOST_CACHE,
    disk_cache: Optional[str] = DISK_CACHE,
    remote_cache: Optional[str] = REMOTE_CACHE,
    cache_ttl: Optional[str] = CACHE_TTL,
    tier_policy: str = TIER_POLICY,
    tier_write: str = TIER_WRITE,
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: debug | info | warning | error"),
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (completions, chat, metrics, /v1/plan, the planner page at /)."""
    try:
        import uvicorn

        from ..units import parse_bytes
        from .app import create_app
    except ImportError as e:
        _fail(f"tierlm serve needs the serve extra (pip install 'tierlm[serve]'): {e}")
        return
    try:
        if planner_only == (model is not None):
            raise TierlmError("give a MODEL, or --planner-only (and no model)")
        if not 0 <= port <= 65535:
            raise TierlmError(f"--port must be in 0..65535, got {port}")
        if max_queue < 0:
            raise TierlmError(f"--max-queue must be >= 0, got {max_queue}")
        if shutdown_grace < 0:
            raise TierlmError(f"--shutdown-grace must be >= 0, got {shutdown_grace}")
        body_limit = parse_bytes(max_request_bytes, "--max-request-bytes")
        if threads is not None and threads < 1:
            raise TierlmError(f"--threads must be >= 1, got {threads}")
        llm = None
        if model is not None:
            _set_threads(threads)
            from ..cli import _engine
            llm = _engine(model, dtype, device, kv_dtype, max_model_len,
                          _tier_options(cache_dir, kv_tiers, host_cache, disk_cache, tier_policy, tier_write,
                                        remote_cache, cache_ttl),
                          max_num_seqs=max_num_seqs)
        app = create_app(llm, model_name=served_model_name or model, api_key=api_key, max_queue=max_queue,
                         max_request_bytes=body_limit, max_tokens_limit=max_tokens_limit,
                         shutdown_grace_s=shutdown_grace)
    except TierlmError as e:
        _fail(str(e))
        return
    if host not in LOOPBACK and api_key is None:
        err.print(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM / SIGINT: refuse new requests, let running ones finish (up to --shutdown-grace),
            then exit with status 0 (uvicorn itself would re-raise the signal after shutting down)."""
            if app.state.engine is not None:
                app.state.engine.drain(shutdown_grace)
            if self.should_exit and sig == 2:      # a second Ctrl-C: stop now
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_grace) + 5)
    server = Server(config)
    server.run()
    if not server.started:
        _fail(f"could not start the server on {host}:{port} (see the log above)")


def _set_threads(threads: int | None) -> None:
    """The engine's intra-op threads. Serving, the event loop (JSON, SSE, sockets) needs a core
    of its own: with every core in the engine's parallel regions, each time the loop runs it
    stalls a region's barrier, which cost half the throughput on 2 cores (BENCHMARKS.md)."""
    import os
    import torch
    if threads is None:
        if "OMP_NUM_THREADS" in os.environ:
            return
        threads = max(1, len(os.sched_getaffinity(0)) - 1)
    torch.set_num_threads(threads)
