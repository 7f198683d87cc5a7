"""Serving: the continuous batcher and what runs on it (batch jobs, HTTP server, chat)."""

from dspark_jax.engine.batcher import ContinuousBatcher, Request, RequestError

__all__ = ["ContinuousBatcher", "Request", "RequestError"]
