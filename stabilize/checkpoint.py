"""Durable checkpoints: the whole training state on disk, written atomically, read safely.

A checkpoint file (format version 2) is::

    b"STABILIZE-CKPT\\n" | 8-byte big-endian header length | header (JSON) | payload | SHA-256 (32 bytes)

* the **header** holds the format version, the payload's codec and length,
  the writer's ``meta`` (its kind, e.g. ``"TorchGuard"``), and the
  *structure* of the saved state as JSON (numbers, strings, lists, dicts;
  tuples and non-string keys encoded explicitly), with each tensor replaced
  by its index in the payload;
* the **payload** holds only tensors: ``torch.save`` of a list of tensors,
  read back with ``torch.load(weights_only=True)``, or ``numpy.savez`` read
  with ``allow_pickle=False``. Nothing in a checkpoint is ever unpickled as an
  arbitrary object, so a checkpoint from elsewhere cannot run code;
* the **SHA-256** covers every byte before it: signature, header and payload.
  Version 1 covered only the payload, so a flipped bit in its header (the
  optimizer's layout, the RNG, the counters) loaded silently; a version-1 file
  is refused by name, and :func:`upgrade` rewrites one you trust.

Writing is atomic: a temp file in the same directory, ``fsync``, ``os.replace``
over the old file, ``fsync`` of the directory (the POSIX recipe; see e.g.
Lightning's ``atomic_save``). A process killed in the middle of a save leaves
the previous checkpoint whole. Its temp file is named after the writer's host
and pid; a later :func:`save` removes only its own leftovers (same host and
pid) and those older than :data:`STALE_AFTER` seconds, never a live writer's
on a shared filesystem. :func:`load` never deletes anything (it works in a
read-only directory).

Reading checks everything before anything is returned: a missing,
truncated, corrupted or foreign file raises :class:`CheckpointError` naming
the file and what is wrong, and the adapters verify the whole state against
the live objects before they change any of it.

Example:
    >>> import numpy as np, os, tempfile
    >>> from stabilize import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> _ = checkpoint.save(path, {"w": np.arange(3.0), "step": 7})
    >>> state = checkpoint.load(path)
    >>> state["step"], state["w"].tolist()
    (7, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import struct
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from .errors import StabilizeError
from .validate import check_path

__all__ = ["CheckpointError", "CheckpointWriteError", "save", "load", "read_header", "upgrade",
           "FORMAT_VERSION", "STALE_AFTER"]

MAGIC = b"STABILIZE-CKPT\n"
FORMAT_VERSION = 2
STALE_AFTER = 3600.0  # seconds: a temp file this old is a dead writer's, whoever wrote it
_TMP = ".tmp-"
_DIGEST = 32
_HEADER_KEYS = {"format", "version", "codec", "payload_bytes", "structure", "meta"}


class CheckpointError(StabilizeError, ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupted, foreign, or of another format."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint that could not be written (disk full, read-only, no such directory); the previous
    file at the path, if any, is whole."""


# -- structure <-> JSON, tensors set aside ------------------------------------------------
def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _encode(obj, tensors: list):
    if _is_torch(obj) or isinstance(obj, np.ndarray):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return {"__set__": [_encode(v, tensors) for v in sorted(obj, key=repr)]}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} ({obj!r:.80}): only tensors, numpy arrays, "
                    f"numbers, strings, None and lists/tuples/dicts of them are saved")


_MARKERS = {"__tensor__", "__tuple__", "__set__", "__items__"}


def _decode(obj, tensors: list, used: set):
    """The saved structure back; every marker checked (a forged or foreign header raises ValueError)."""
    if isinstance(obj, list):
        return [_decode(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    marker = [k for k in obj if k.startswith("__")]
    if not marker:
        return {k: _decode(v, tensors, used) for k, v in obj.items()}
    if len(obj) != 1 or marker[0] not in _MARKERS:
        raise ValueError(f"unknown entry {sorted(obj)[:3]}")
    key, value = marker[0], obj[marker[0]]
    if key == "__tensor__":
        if type(value) is not int or not 0 <= value < len(tensors) or value in used:
            raise ValueError(f"tensor index {value!r} (the payload holds {len(tensors)})")
        used.add(value)
        return tensors[value]
    if not isinstance(value, list):
        raise ValueError(f"{key} holds a {type(value).__name__}, not a list")
    if key == "__tuple__":
        return tuple(_decode(v, tensors, used) for v in value)
    if key == "__set__":
        return {_hashable(_decode(v, tensors, used)) for v in value}
    if not all(isinstance(kv, list) and len(kv) == 2 for kv in value):
        raise ValueError("__items__ holds something other than [key, value] pairs")
    return {_hashable(_decode(k, tensors, used)): _decode(v, tensors, used) for k, v in value}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


# -- payload codecs: tensors only, never arbitrary objects ------------------------------------
def _pack(tensors: list) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if any(_is_torch(t) for t in tensors):
        torch = sys.modules["torch"]
        kinds = ["numpy" if isinstance(t, np.ndarray) else "torch" for t in tensors]
        as_torch = [torch.from_numpy(np.require(t, requirements="C")) if k == "numpy" else t.detach().cpu()
                    for t, k in zip(tensors, kinds)]
        torch.save({"tensors": as_torch, "kinds": kinds}, buf)
        return "torch", buf.getvalue()
    np.savez(buf, *[np.require(t, requirements="C") for t in tensors])
    return "npz", buf.getvalue()


def _unpack(codec: str, payload: bytes, where: str) -> list:
    if codec == "npz":
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
    try:
        import torch
    except ImportError as exc:
        raise CheckpointError(f"{where}: its tensors were saved by torch, which cannot be imported here "
                              f"(pip install 'stabilize-nn[torch]')") from exc
    data = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    if not isinstance(data, dict) or set(data) != {"tensors", "kinds"} or len(data["tensors"]) != len(data["kinds"]) \
            or not all(torch.is_tensor(t) and k in ("numpy", "torch") for t, k in zip(data["tensors"], data["kinds"])):
        raise ValueError("the payload is not a list of tensors")
    return [t.numpy() if k == "numpy" else t for t, k in zip(data["tensors"], data["kinds"])]


# -- writing ---------------------------------------------------------------------------------------
def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _sweep(path: Path) -> None:
    """Remove the writer's own temp files of ``path`` (this host and pid) and any older than
    :data:`STALE_AFTER`; another writer's recent temp file (a live save) is left alone."""
    prefix, mine, now = f".{path.name}{_TMP}", f"{_host()}-{os.getpid()}", time.time()
    for stale in path.parent.glob(f"{prefix}*"):
        writer = stale.name[len(prefix):].rsplit("-", 1)[0]
        try:
            if writer == mine or now - stale.stat().st_mtime > STALE_AFTER:
                stale.unlink()
        except OSError:  # gone already, or not ours to remove: the save itself says if it cannot write
            pass


def save(path, state, *, meta: dict | None = None) -> Path:
    """Write ``state`` (tensors, arrays and plain values, nested) to ``path`` atomically.

    ``meta`` is extra JSON kept in the header (readable with :func:`read_header`).
    Returns the path. The previous file at ``path`` stays whole until the new
    one is complete and synced.

    Raises:
        TypeError: ``state`` holds something other than tensors, arrays and plain values.
        CheckpointWriteError: the file could not be written (it names the path and the cause).
    """
    path = Path(check_path(path, "save_checkpoint"))
    tensors: list = []
    structure = _encode(state, tensors)
    codec, payload = _pack(tensors)
    header = json.dumps({"format": "stabilize-checkpoint", "version": FORMAT_VERSION, "codec": codec,
                         "payload_bytes": len(payload), "structure": structure, "meta": meta or {}}).encode()
    body = MAGIC + struct.pack(">Q", len(header)) + header
    digest = hashlib.sha256(body)
    digest.update(payload)
    tmp = path.with_name(f".{path.name}{_TMP}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep(path)
        try:
            with open(tmp, "wb") as f:
                f.write(body)
                f.write(payload)
                f.write(digest.digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable only once the directory is synced
        finally:
            os.close(dir_fd)
    except OSError as exc:
        message = (f"cannot save checkpoint {str(path)!r}: {exc.strerror or exc} ({type(exc).__name__}); the "
                   f"previous file there, if any, is unchanged")
        error = CheckpointWriteError(message)
        error.errno = exc.errno  # ``except OSError`` handlers can still read why
        raise error from exc
    return path


# -- reading ---------------------------------------------------------------------------------------
def _bytes_of(path: Path, where: str) -> bytes:
    if path.is_dir():
        raise CheckpointError(f"{where} is a directory, not a checkpoint file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{where} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc.strerror or exc}") from exc


def _split(data: bytes, where: str) -> tuple[int, bytes]:
    """``(header length, header bytes)`` after the signature and size checks (nothing trusted yet)."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{where} is not a stabilize checkpoint (no {MAGIC!r} signature)")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise CheckpointError(f"{where} is truncated: {len(data)} bytes, shorter than its own header")
    (hlen,) = struct.unpack(">Q", data[len(MAGIC):start])
    if start + hlen > len(data):
        raise CheckpointError(f"{where} is truncated: its header announces {hlen} bytes, the file holds "
                              f"{len(data) - start}")
    return hlen, data[start:start + hlen]


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _read(path, *, legacy: bool = False) -> tuple[dict, bytes]:
    path = Path(check_path(path, "load_checkpoint"))
    where = f"checkpoint {str(path)!r}"
    data = _bytes_of(path, where)
    hlen, raw = _split(data, where)
    start = len(MAGIC) + 8
    header = _json(raw)
    version = header.get("version") if isinstance(header, dict) else None
    if version == 1 and isinstance(header.get("payload_bytes"), int) \
            and len(data) == start + hlen + header["payload_bytes"]:
        if not legacy:
            raise CheckpointError(f"{where} has format version 1, whose checksum does not cover its header; this "
                                  f"stabilize reads version {FORMAT_VERSION}. If you trust the file, rewrite it once "
                                  f"with stabilize.checkpoint.upgrade({str(path)!r})")
        payload = data[start + hlen:]
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise CheckpointError(f"{where} is corrupted: the SHA-256 of its tensors does not match its header")
        return _checked(header, payload, where, {"sha256"}, 1), payload
    announced = header.get("payload_bytes") if isinstance(header, dict) else None
    if isinstance(announced, int) and len(data) < start + hlen + announced + _DIGEST:  # only the message uses it
        raise CheckpointError(f"{where} is truncated: {max(0, len(data) - start - hlen - _DIGEST)} payload bytes of "
                              f"{announced} and its SHA-256")
    if len(data) < start + hlen + _DIGEST:
        raise CheckpointError(f"{where} is truncated: it ends before its SHA-256")
    if hashlib.sha256(data[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise CheckpointError(f"{where} is corrupted or truncated: the SHA-256 of its {len(data) - _DIGEST} bytes "
                              f"does not match the one it ends with")
    if header is None:  # the digest matched, so the writer wrote it so: not ours
        raise CheckpointError(f"{where}: its header is not valid JSON")
    if isinstance(header, dict) and version not in (None, FORMAT_VERSION):
        raise CheckpointError(f"{where} has format version {version!r}; this stabilize reads version "
                              f"{FORMAT_VERSION}: load it with the version that wrote it")
    return _checked(header, data[start + hlen:-_DIGEST], where, set(), FORMAT_VERSION), data[start + hlen:-_DIGEST]


def _checked(header, payload: bytes, where: str, extra: set, version: int) -> dict:
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: its header is a {type(header).__name__}, not a JSON object")
    if header.get("format") != "stabilize-checkpoint":
        raise CheckpointError(f"{where}: unknown format {header.get('format')!r}")
    if set(header) != _HEADER_KEYS | extra:
        raise CheckpointError(f"{where}: its header has sections {sorted(header)}, expected "
                              f"{sorted(_HEADER_KEYS | extra)}")
    if header["version"] != version or header["codec"] not in ("npz", "torch") or not isinstance(header["meta"], dict):
        raise CheckpointError(f"{where}: its header names version {header['version']!r}, codec "
                              f"{header['codec']!r} and meta of type {type(header['meta']).__name__}")
    if header["payload_bytes"] != len(payload):
        raise CheckpointError(f"{where} is truncated: {len(payload)} payload bytes of {header['payload_bytes']}")
    return header


def read_header(path) -> dict:
    """The verified header of a checkpoint (version, codec, sizes, ``meta``)."""
    header, _ = _read(path)
    return {k: v for k, v in header.items() if k != "structure"}


def _load(path, legacy: bool) -> tuple[dict, object]:
    header, payload = _read(path, legacy=legacy)
    where = f"checkpoint {str(path)!r}"
    try:
        tensors = _unpack(header["codec"], payload, where)
        used: set = set()
        state = _decode(header["structure"], tensors, used)
        if len(used) != len(tensors):
            raise ValueError(f"{len(tensors) - len(used)} of its {len(tensors)} tensors are not placed in its state")
    except CheckpointError:
        raise
    except Exception as exc:  # the checksum matched, so the writer itself wrote something unreadable
        raise CheckpointError(f"{where}: its tensors cannot be read ({type(exc).__name__}: {exc})") from exc
    return header, state


def load(path, *, kind: str | None = None, sections: set | None = None, reader: str | None = None):
    """Read and verify a checkpoint; returns the saved state (torch tensors on CPU, numpy arrays).

    With ``kind`` and ``sections`` (what the adapters pass), the file must have been written by
    ``kind`` (its ``meta["kind"]``) and hold a dict of exactly ``sections``; ``reader`` names who
    reads it in the error.

    Raises:
        CheckpointError: the file is missing, a directory, truncated, corrupted, of another format or
            version, or (with ``kind``) written by something else or missing a section.
    """
    header, state = _load(path, legacy=False)
    if kind is None:
        return state
    where = f"checkpoint {str(path)!r}"
    written_by = header["meta"].get("kind")
    if written_by != kind:
        raise CheckpointError(f"{where} was written by {written_by or 'something other than a stabilize adapter'}; "
                              f"{reader or kind} reads only checkpoints written by {kind}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a {kind} state")
    missing, unknown = set(sections or ()) - set(state), set(state) - set(sections or ())
    if missing or unknown:
        raise CheckpointError(f"{where}: sections missing {sorted(missing)}, unknown {sorted(map(str, unknown))}; "
                              f"a {kind} checkpoint holds {sorted(sections or ())}")
    return state


def upgrade(path) -> Path:
    """Rewrite a version-1 checkpoint you trust in the current format (its header then covered by the
    checksum). Example: ``stabilize.checkpoint.upgrade("run.ckpt")``."""
    header, state = _load(path, legacy=True)
    return save(path, state, meta=header["meta"])


def check_policy_state(settings, saved, where: str) -> None:
    """Verify a saved Supervisor ``state_dict`` on a scratch Supervisor (nothing live changes): the same
    sections as this version writes, each readable; else CheckpointError naming ``where``."""
    from .guard.supervisor import Supervisor

    scratch = Supervisor(settings)
    expected = set(scratch.state_dict())
    if not isinstance(saved, dict) or set(saved) != expected:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{where}: its policy state holds {found}, expected {sorted(expected)}")
    try:
        scratch.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{where}: its policy state cannot be read ({type(exc).__name__}: {exc})") from exc
