"""An OpenAI-compatible HTTP server over the continuous batcher (FastAPI + uvicorn).

  python serve.py --config.mode=server --config.host=127.0.0.1 --config.port=8000

Endpoints: `/v1/completions`, `/v1/chat/completions` (streaming SSE or not), `/v1/models`,
`/health`, `/metrics` (Prometheus text: request, token and speculative counters named like
vLLM's, queue depth, latency histograms).

Threads: one engine thread owns the `ContinuousBatcher` and steps it while any request is
waiting or running; HTTP handlers run on uvicorn's event loop, submit requests into the
bounded waiting queue (full: 429) and receive tokens through `call_soon_threadsafe`.
A client that disconnects cancels its request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from fastapi import Request as HTTPRequest  # module level: FastAPI resolves handler annotations here

from dspark_jax.engine.batcher import ContinuousBatcher, Request, RequestError

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
  """The waiting queue is full."""


class EngineLoop:
  """Runs `batcher.step()` on its own thread while there is work."""

  def __init__(self, batcher: ContinuousBatcher, *, max_waiting: int = 256):
    self.batcher = batcher
    self.max_waiting = max_waiting
    self._cv = threading.Condition()
    self._stop = False
    self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
    self.on_finish = []  # callbacks(request) run on the engine thread (metrics)

  def start(self) -> "EngineLoop":
    self._thread.start()
    return self

  def stop(self) -> None:
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join(timeout=30)

  def submit(self, req: Request) -> Request:
    if self.batcher.num_waiting >= self.max_waiting:
      raise Overloaded(f"server busy: {self.batcher.num_waiting} requests waiting")
    self.batcher.submit(req)
    with self._cv:
      self._cv.notify()
    return req

  def _run(self) -> None:
    while True:
      with self._cv:
        while self.batcher.idle and not self._stop:
          self._cv.wait(timeout=1.0)
        if self._stop:
          return
      try:
        for r in self.batcher.step():
          if r.done:
            for cb in self.on_finish:
              cb(r)
      except Exception:  # a failed step must not leave clients hanging forever
        log.exception("engine step failed; failing the running requests")
        self.batcher.fail_all("error")


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None):
  from fastapi.responses import JSONResponse
  return JSONResponse(status_code=status, content={
      "error": {"message": message, "type": kind, "param": param, "code": status}})


def _metrics_registry(batcher: ContinuousBatcher, loop: EngineLoop):
  from prometheus_client import CollectorRegistry, Histogram
  from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

  registry = CollectorRegistry()

  class _Counters:
    def collect(self):
      c = batcher.counters
      for name, value, doc in [
          ("dspark_request_success", c.requests_finished, "finished requests"),
          ("dspark_prompt_tokens", c.prompt_tokens, "prompt tokens admitted"),
          ("dspark_generation_tokens", c.generation_tokens, "tokens generated"),
          ("dspark_engine_steps", c.steps, "device calls of the decode loop"),
          ("dspark_spec_decode_num_drafts", c.num_drafts, "rounds that proposed a block"),
          ("dspark_spec_decode_num_draft_tokens", c.num_draft_tokens, "draft tokens verified"),
          ("dspark_spec_decode_num_accepted_tokens", c.num_accepted_tokens,
           "draft tokens accepted")]:
        yield CounterMetricFamily(name, doc, value=value)
      yield GaugeMetricFamily("dspark_num_requests_waiting", "requests in the queue",
                              value=batcher.num_waiting)
      yield GaugeMetricFamily("dspark_num_requests_running", "requests in slots",
                              value=batcher.num_running)
      mean = GaugeMetricFamily("dspark_spec_decode_mean_acceptance_length",
                               "tokens committed per proposing round (accepted + 1)")
      mean.add_metric([], 1.0 + c.num_accepted_tokens / c.num_drafts if c.num_drafts else 0.0)
      yield mean
      if c.position_tries is not None:
        pos = GaugeMetricFamily("dspark_spec_decode_position_acceptance",
                                "P(accept position k | reached k)", labels=["position"])
        for k, (h, t) in enumerate(zip(c.position_hits, c.position_tries)):
          pos.add_metric([str(k)], float(h) / float(t) if t else 0.0)
        yield pos

  registry.register(_Counters())
  buckets = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
  e2e = Histogram("dspark_e2e_request_latency_seconds", "submit to last token",
                  registry=registry, buckets=buckets)
  ttft = Histogram("dspark_time_to_first_token_seconds", "submit to first token",
                   registry=registry, buckets=buckets)

  def observe(r: Request) -> None:
    if r.latency_s is not None:
      e2e.observe(r.latency_s)
    if r.ttft_s is not None:
      ttft.observe(r.ttft_s)

  loop.on_finish.append(observe)
  return registry


def create_app(target, batcher: ContinuousBatcher, loop: EngineLoop, *, model_name: str):
  """The FastAPI app; `loop` must be started by the caller."""
  from fastapi import FastAPI
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import PlainTextResponse, StreamingResponse
  from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

  app = FastAPI(title="dspark-jax", version="0.1")
  registry = _metrics_registry(batcher, loop)
  tok = target.tokenizer

  @app.exception_handler(RequestValidationError)
  async def _bad_body(_, exc):  # OpenAI clients expect 400 + an error object, not 422
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ())[1:])
    return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where
                  else "invalid request body")

  @app.get("/health")
  async def health():
    return {"status": "ok", "running": batcher.num_running, "waiting": batcher.num_waiting}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "dspark-jax"}]}

  @app.get("/metrics")
  async def metrics():
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

  def parse(body: dict, chat: bool) -> Request:
    if not isinstance(body, dict):
      raise RequestError("the request body must be a JSON object")
    if body.get("model", model_name) != model_name:
      raise RequestError(f"unknown model {body.get('model')!r}; this server serves "
                         f"{model_name!r}")
    if int(body.get("n", 1)) != 1:
      raise RequestError("n must be 1")
    if chat:
      msgs = body.get("messages")
      if not isinstance(msgs, list) or not msgs or not all(
          isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str)
          for m in msgs):
        raise RequestError("messages must be a non-empty list of {role, content} objects")
      if tok is None or not tok.has_chat_template:
        raise RequestError("this model has no chat template; use /v1/completions")
      ids = tok.apply_chat_template([{"role": m["role"], "content": m["content"]}
                                     for m in msgs])
    else:
      prompt = body.get("prompt")
      if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
      if isinstance(prompt, str):
        if tok is None:
          raise RequestError("this model has no tokenizer; send the prompt as token ids")
        ids = tok.encode(prompt)
      elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
      else:
        raise RequestError("prompt must be a string or a list of token ids")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
      raise RequestError("stop must be a string or a list of at most 4 strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    try:
      temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None
                          else 1.0)
      top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
      top_k = int(body.get("top_k") or 0)
      seed = body.get("seed")
      seed = None if seed is None else int(seed)
      max_tokens = None if max_tokens is None else int(max_tokens)
    except (TypeError, ValueError) as e:
      raise RequestError(f"bad sampling parameter: {e}") from None
    if seed is not None and not 0 <= seed < 1 << 24:
      raise RequestError("seed must be in [0, 2**24)")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: length-only requests
    if not isinstance(ignore_eos, bool):
      raise RequestError("ignore_eos must be true or false")
    return Request(prompt=ids, max_new_tokens=max_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_strings=tuple(stop), request_id=seed,
                   stop_tokens=[] if ignore_eos else None,
                   id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24])

  async def handle(http: HTTPRequest, chat: bool):
    try:
      body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      return _error(400, "the request body is not valid JSON")
    try:
      req = parse(body, chat)
      stream = bool(body.get("stream", False))
      aio = asyncio.get_running_loop()
      updates: asyncio.Queue = asyncio.Queue()

      def on_update(r: Request) -> None:  # engine thread -> event loop (snapshot the values)
        aio.call_soon_threadsafe(updates.put_nowait,
                                 (r.stable_text(), len(r.tokens), r.done, r.finish_reason))
      req.on_update = on_update
      loop.submit(req)
    except RequestError as e:
      return _error(400, str(e))
    except Overloaded as e:
      return _error(429, str(e), kind="server_overloaded")
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def choice(text: str, finish: str | None, delta: bool):
      if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
      msg = {"role": "assistant", "content": text}
      return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": finish}

    def usage(n_out: int):
      return {"prompt_tokens": len(req.prompt), "completion_tokens": n_out,
              "total_tokens": len(req.prompt) + n_out}

    if not stream:
      while True:
        try:
          text, n_out, done, finish = await asyncio.wait_for(updates.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            req.cancel()
            return _error(499, "client closed the request")
          continue
        if done:
          break
      if finish == "error":
        return _error(500, "generation failed", kind="server_error")
      return {"id": req.id, "object": kind, "created": created, "model": model_name,
              "choices": [choice(text, finish, delta=False)], "usage": usage(n_out)}

    async def events():
      sent = 0
      obj = kind + (".chunk" if chat else "")
      try:
        while True:
          text, n_out, done, finish = await updates.get()
          if len(text) > sent or done:
            chunk = {"id": req.id, "object": obj, "created": created, "model": model_name,
                     "choices": [choice(text[sent:], finish if done else None, delta=True)]}
            if done:
              chunk["usage"] = usage(n_out)
            sent = len(text)
            yield f"data: {json.dumps(chunk)}\n\n"
          if done:
            yield "data: [DONE]\n\n"
            return
      finally:
        if not req.done:  # the client went away mid-stream: free the slot
          req.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")

  @app.post("/v1/completions")
  async def completions(http: HTTPRequest):
    return await handle(http, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HTTPRequest):
    return await handle(http, chat=True)

  return app


class Server:
  """uvicorn + engine thread; `start()` returns once the port accepts connections."""

  def __init__(self, target, batcher: ContinuousBatcher, *, host: str = "127.0.0.1",
               port: int = 8000, model_name: str = "dspark", max_waiting: int = 256):
    import uvicorn
    self.loop = EngineLoop(batcher, max_waiting=max_waiting)
    self.app = create_app(target, batcher, self.loop, model_name=model_name)
    self._uv = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                             lifespan="off"))
    self._thread: threading.Thread | None = None

  @property
  def port(self) -> int:
    servers = getattr(self._uv, "servers", None) or []
    for s in servers:
      for sock in s.sockets:
        return sock.getsockname()[1]
    return self._uv.config.port

  def start(self, timeout: float = 60.0) -> "Server":
    self.loop.start()
    self._thread = threading.Thread(target=self._uv.run, name="dspark-http", daemon=True)
    self._thread.start()
    t0 = time.time()
    while not self._uv.started:
      if time.time() - t0 > timeout or not self._thread.is_alive():
        raise RuntimeError(f"the HTTP server did not start on {self._uv.config.host}:"
                           f"{self._uv.config.port}")
      time.sleep(0.05)
    return self

  def serve_forever(self) -> None:
    self.loop.start()
    try:
      self._uv.run()
    finally:
      self.loop.stop()

  def stop(self) -> None:
    self._uv.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout=30)
    self.loop.stop()

