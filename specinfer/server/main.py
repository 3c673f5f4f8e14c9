"""`specinfer serve`: load the models, then run the HTTP server until SIGINT/SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits for the requests in flight to finish; the
engine loop keeps stepping until they have, then the process exits. Under tensor parallelism rank 0
serves HTTP and the other ranks replay its engine calls (distributed/lockstep.py) until it closes.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from ..default_model import DEFAULT_MODEL_NAME
from ..errors import SpecInferError

log = logging.getLogger(__name__)


def default_model_name(llm_arg: str | None, llm_path: Path) -> str:
    if llm_arg is None:
        return DEFAULT_MODEL_NAME
    return llm_path.stem if llm_path.is_file() else llm_path.name


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..cli import engine_configs
    from ..llm import LLM
    from .app import build_app

    if not 0 <= args.port < 65536:
        raise SpecInferError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queued_requests < 0:
        raise SpecInferError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
    engine, speculation = engine_configs(args)
    llm = LLM(args.llm, args.ssms, args.tokenizer, engine, speculation)
    manager = None
    if llm.tp is not None:
        from ..distributed.lockstep import LockstepManager, follow

        if not llm.tp.is_first:
            follow(llm.manager)
            return 0
        manager = LockstepManager(llm.manager)
    name = args.served_model_name or default_model_name(args.llm, llm.model_path)
    app = build_app(llm, name, args.max_queued_requests, manager)
    log.info("serving %r (%s speculation) on http://%s:%d/v1", name, speculation.mode, args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found; a no-op handler makes
    # that drained shutdown end as a normal exit (status 0) instead of a death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1
