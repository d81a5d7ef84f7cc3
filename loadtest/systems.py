"""The systems a comparison can start: command lines, readiness probes, request model names."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

OURS_SPEC = "ours-spec"
OURS_NOSPEC = "ours-nospec"
TRANSFORMERS = "transformers-serve"
HF_PLAIN = "hf-plain"
HF_ASSISTED = "hf-assisted"
HF_PROMPT_LOOKUP = "hf-prompt-lookup"
SERVER_SYSTEMS = (OURS_SPEC, OURS_NOSPEC, TRANSFORMERS)
HF_SYSTEMS = (HF_PLAIN, HF_ASSISTED, HF_PROMPT_LOOKUP)
ALL_SYSTEMS = SERVER_SYSTEMS + HF_SYSTEMS

# (system, baseline): speculation against the same stack without it, then across stacks.
DEFAULT_SPEEDUPS = [
    (OURS_SPEC, OURS_NOSPEC),
    (HF_ASSISTED, HF_PLAIN),
    (HF_PROMPT_LOOKUP, HF_PLAIN),
    (OURS_SPEC, HF_PLAIN),
    (OURS_SPEC, TRANSFORMERS),
]


@dataclass(frozen=True)
class ServerSystem:
    name: str
    argv: list[str]
    ready_path: str
    model: str | None = None  # None: ask /v1/models
    env: dict[str, str] = field(default_factory=dict)


def venv_tool(name: str) -> str:
    """A console script next to this interpreter (the venv's), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"no {name!r} next to {sys.executable} nor on PATH")
    return found


def ours(name: str, port: int, serve_args: list[str]) -> ServerSystem:
    """Our server; ``ours-nospec`` appends ``--gamma 0``, which wins over an earlier --gamma.

    Every level replays the same prompts, so a free slot would still hold an earlier level's
    copy of a prompt and the prefix cache would skip its prefill: prompts run cold unless
    ``serve_args`` turn the cache back on (the later flag wins).
    """
    argv = [venv_tool("specserve"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-prefix-cache", *serve_args]
    if name == OURS_NOSPEC:
        argv += ["--gamma", "0"]
    # /ready turns 200 only after the engine's warm-up; /health answers from the start.
    return ServerSystem(name, argv, "/ready")


def transformers_serve(port: int, model_dir: Path, extra_args: list[str]) -> ServerSystem:
    """``transformers serve`` pinned to one local model directory, offline.

    It preloads the pinned model before listening, so /health means ready (its /v1/models scans
    the hub cache and fails without one). A pinned server refuses any other ``model`` name. It
    runs through ``loadtest.peer_serve``, which turns its prefix cache off as ours is.
    """
    argv = [sys.executable, "-m", "loadtest.peer_serve", "serve", "--continuous-batching"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16"]
    argv += [*extra_args, str(model_dir)]
    # The harness's own package must import in the child whatever its working directory (an
    # editable install provides it; a bare checkout does not), beside any PYTHONPATH given.
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }
    return ServerSystem(TRANSFORMERS, argv, "/health", model=str(model_dir), env=env)
