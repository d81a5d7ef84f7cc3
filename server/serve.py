"""``specserve serve``: load the pair once, then serve it over HTTP until interrupted."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import uvicorn

from engine.loader import DEFAULT_PAIR, LOAD_ERRORS
from server.app import create_app
from server.context import ServerConfig

log = logging.getLogger("specserve.server")

T = TypeVar("T")

# Long enough for open streams to finish a round, short enough that Ctrl-C feels prompt.
_GRACEFUL_SHUTDOWN_S = 5


def _check_args(args: argparse.Namespace) -> str | None:
    """Cheap checks first, so a typo does not cost a model load."""
    if args.max_queue < 0:
        return f"--max-queue must be >= 0, got {args.max_queue}"
    if args.send_timeout <= 0:
        return f"--send-timeout must be > 0, got {args.send_timeout}"
    if not 0 <= args.port <= 65535:
        return f"--port must be in 0..65535, got {args.port}"
    for name in ("max_body_bytes", "max_n", "max_stop", "max_stop_chars"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    return None


def _in_passing_thread(build: Callable[[], T]) -> T:
    """``build()`` in a thread that ends when it returns. OpenMP gives every thread that runs
    parallel regions a pool of workers of its own; with two pools (the loading thread's and
    the engine thread's) there are more workers than cores, so libgomp cuts every worker's
    spin-wait short and each of a forward's hundreds of parallel regions waits on a futex
    wake-up: decoding in the engine thread measured ~15 % slower. A finished thread's pool
    goes with it, leaving the engine thread's the only one."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(build())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    # A daemon, so that Ctrl-C during a long load (a first GGUF conversion) exits at once, as
    # it did when the main thread loaded; the conversion cache is written by atomic renames.
    thread = threading.Thread(target=target, name="specserve-load", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def run(args: argparse.Namespace) -> int:
    from server.cli import build_engine

    problem = _check_args(args)
    if problem is not None:
        print(f"specserve: {problem}", file=sys.stderr)
        return 2
    try:
        engine, target, draft = _in_passing_thread(lambda: build_engine(args))
    except LOAD_ERRORS as exc:
        print(f"specserve: {exc}", file=sys.stderr)
        return 1
    model_name = args.model_name or target.name
    names = [target.name, args.target or DEFAULT_PAIR]
    aliases = tuple(name for name in dict.fromkeys(names) if name != model_name)
    config = ServerConfig(
        model_name=model_name,
        draft_name=draft.name if draft is not None else None,
        api_key=args.api_key or None,
        max_queue=args.max_queue,
        aliases=aliases,
        send_timeout_s=args.send_timeout,
        max_body_bytes=args.max_body_bytes,
        max_n=args.max_n,
        max_stop=args.max_stop,
        max_stop_chars=args.max_stop_chars,
    )
    log.info(
        "serving %r (target %s, draft %s, gamma %d) on http://%s:%d",
        model_name, target.name, config.draft_name, engine.gamma, args.host, args.port,
    )  # fmt: skip
    app = create_app(engine, config)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
    )
    return 0
