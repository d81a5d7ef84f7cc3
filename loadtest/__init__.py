"""Load-test and comparison harness for OpenAI-compatible servers (``python -m loadtest``)."""
