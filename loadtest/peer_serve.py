"""``transformers serve`` with its prefix cache off: ``python -m loadtest.peer_serve serve ...``.

transformers' continuous batching shares KV blocks between requests with a common prefix
(``ContinuousBatchingConfig.allow_block_sharing``, on by default, no CLI flag). Every level of a
comparison replays the same prompts, so from the second level on the peer would skip the
prefill of prompts an earlier level left in its cache, while our server runs with
``--no-prefix-cache``: a 2026-12-02 run measured the peer at 12.8 tok/s at c=8 right after a
c=1 level, its first token at 6.1 s for every request alike. Both stacks compute every prompt.
"""

from __future__ import annotations

import sys

from transformers.generation.configuration_utils import ContinuousBatchingConfig


def disable_block_sharing() -> None:
    """Every ContinuousBatchingConfig made from now on in this process shares no KV blocks."""
    original = ContinuousBatchingConfig.__post_init__

    def post_init(self: ContinuousBatchingConfig) -> None:
        original(self)
        self.allow_block_sharing = False

    ContinuousBatchingConfig.__post_init__ = post_init  # type: ignore[method-assign]


def main() -> int:
    disable_block_sharing()
    from transformers.cli.transformers import main as transformers_main

    sys.argv[0] = "transformers"
    transformers_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
