"""Metric sinks: stdout, `metrics.jsonl`, and TensorBoard event files (no TF dependency).

The event writer emits the TFRecord framing (length, masked CRC-32C, payload,
masked CRC-32C) around hand-encoded `Event{wall_time, step, summary{value{tag,
simple_value}}}` protobufs, which is all TensorBoard needs for scalar plots.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, wire: int) -> bytes:
  return _varint((num << 3) | wire)


def _bytes_field(num: int, payload: bytes) -> bytes:
  return _field(num, 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  ev = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(max(step, 0))
  if file_version is not None:
    ev += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b""
    for tag, value in scalars.items():
      val = _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(value))
      summary += _bytes_field(1, val)
    ev += _bytes_field(5, summary)
  return ev


def read_events(path: str) -> list[bytes]:
  """Reads back event payloads, verifying the framing CRCs (for tests)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == masked_crc(header), "header crc"
    payload = data[i + 12:i + 12 + n]
    assert struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] == masked_crc(payload), "crc"
    out.append(payload)
    i += 16 + n
  return out


class EventWriter:
  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._write(encode_event(0, time.time(), file_version="brain.Event:2"))

  def _write(self, payload: bytes):
    header = struct.pack("<Q", len(payload))
    self._f.write(header + struct.pack("<I", masked_crc(header)) + payload
                  + struct.pack("<I", masked_crc(payload)))

  def scalars(self, step: int, values: dict[str, float]):
    self._write(encode_event(step, time.time(), values))
    self._f.flush()

  def close(self):
    self._f.close()


class MetricsLogger:
  """Writes each metrics dict to stdout (optional), `metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, echo=None,
               resume_step: int | None = None, enabled: bool = True):
    """`resume_step`: drop JSON lines logged after this step by a run that was killed
    before its next checkpoint (they are about to be logged again). `enabled=False` (every
    host but the first in a multi-host run) makes every method a no-op."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(path, "w") as f:
        f.writelines(keep)
    self.jsonl = open(path, "a")
    self.tb = EventWriter(os.path.join(workdir, "tb")) if tensorboard else None
    self.echo = echo

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      self.tb.scalars(step, clean)
    if self.echo is not None:
      shown = " ".join(f"{k}={v:.4g}" for k, v in clean.items())
      self.echo(f"step {step}: {shown}")

  def close(self):
    if not self.enabled:
      return
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()
