"""What every route needs: the configuration, the engine front, the tokenizer, the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from engine.engine import Engine
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.tokens import TokenText


@dataclass(frozen=True)
class ServerConfig:
    model_name: str  # what clients put in "model"
    draft_name: str | None = None  # shown in /v1/models
    # Bearer key for /v1/*; None = open. Kept out of repr so logging the config cannot leak it.
    api_key: str | None = field(default=None, repr=False)
    max_queue: int = 64  # engine requests waiting for a slot before 429
    aliases: tuple[str, ...] = ()  # other names accepted in "model" (e.g. the target's path)
    send_timeout_s: float = 30.0  # drop a streaming client that stops reading for this long
    retry_after_s: int = 1  # the Retry-After of a 429
    # Request limits: past them a request is refused (413 for the body, 400 otherwise) before it
    # costs tokenization or a slot.
    max_body_bytes: int = 4 * 2**20
    max_n: int = 16  # choices per prompt (also bounded by slots + queue)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.send_timeout_s <= 0:
            raise ValueError(f"send_timeout_s must be > 0, got {self.send_timeout_s}")
        for name in ("max_body_bytes", "max_n", "max_stop", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ServerContext:
    engine: Engine
    config: ServerConfig
    core: AsyncEngine
    metrics: ServerMetrics
    tokens: TokenText
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, model: str | None) -> str:
        """The served name for a request's "model"; 404 for anything this server does not serve."""
        if model is None or model == self.config.model_name or model in self.config.aliases:
            return self.config.model_name
        raise APIError(
            404,
            f"the model {model!r} does not exist: this server serves {self.config.model_name!r}",
            param="model",
            code="model_not_found",
        )


def get_context(request: Request) -> ServerContext:
    return request.app.state.context
