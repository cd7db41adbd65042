"""Durable checkpoints: the whole training state on disk, written atomically, read safely.

A checkpoint file is::

    b"STABILIZE-CKPT\\n"  | 8-byte big-endian header length | header (JSON) | payload

* the **header** holds the format version, the payload's codec, its length
  and SHA-256, and the *structure* of the saved state as JSON (numbers,
  strings, lists, dicts; tuples and non-string keys encoded explicitly), with
  each tensor replaced by its index in the payload;
* the **payload** holds only tensors: ``torch.save`` of a list of tensors,
  read back with ``torch.load(weights_only=True)``, or ``numpy.savez`` read
  with ``allow_pickle=False``. Nothing in a checkpoint is ever unpickled as an
  arbitrary object, so a checkpoint from elsewhere cannot run code.

Writing is atomic: a temp file in the same directory, ``fsync``, ``os.replace``
over the old file, ``fsync`` of the directory (the POSIX recipe; see e.g.
Lightning's ``atomic_save``). A process killed in the middle of a save leaves
the previous checkpoint whole; its temp file (named after the writer's pid)
is removed by the next :func:`save` or :func:`load` once that pid is gone.

Reading checks everything before anything is returned: a truncated or
corrupted file raises :class:`CheckpointError` naming the file and what is
wrong, and the live training state is never touched (the adapters load only
a fully verified state).

Example:
    >>> import numpy as np, os, tempfile
    >>> from stabilize import checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> checkpoint.save(path, {"w": np.arange(3.0), "step": 7})
    >>> state = checkpoint.load(path)
    >>> state["step"], state["w"].tolist()
    (7, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import sys
import uuid
from pathlib import Path

import numpy as np

from .errors import StabilizeError

__all__ = ["CheckpointError", "save", "load", "read_header", "FORMAT_VERSION"]

MAGIC = b"STABILIZE-CKPT\n"
FORMAT_VERSION = 1
_TMP = ".tmp-"


class CheckpointError(StabilizeError, ValueError):
    """A checkpoint that cannot be read: missing, truncated, corrupted, or of another format."""


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


def _decode(obj, tensors: list):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__set__" in obj:
        return {_decode(v, tensors) for v in obj["__set__"]}
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


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
    if codec == "torch":
        try:
            import torch
        except ImportError as exc:
            raise CheckpointError(f"{where}: its tensors were saved by torch, which cannot be imported here "
                                  f"(pip install 'stabilize[torch]')") from exc
        data = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        return [t.numpy() if k == "numpy" else t for t, k in zip(data["tensors"], data["kinds"])]
    raise CheckpointError(f"{where}: unknown payload codec {codec!r}")


# -- the file ------------------------------------------------------------------------------------
def _sweep(path: Path) -> None:
    """Remove temp files of ``path`` whose writer (named by pid in the file name) is gone."""
    prefix = f".{path.name}{_TMP}"
    for stale in path.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checked_path(path, op: str) -> Path:
    """``path`` as a ``Path``; anything but a str or ``os.PathLike`` is one TypeError naming the argument."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise TypeError(f"{op}: path must be a file path (a str or a pathlib.Path), got {type(path).__name__} "
                        f"{path!r:.60}; e.g. {op}('run.ckpt')")
    return Path(path)


def save(path, state, *, meta: dict | None = None) -> Path:
    """Write ``state`` (tensors, arrays and plain values, nested) to ``path`` atomically.

    ``meta`` is extra JSON kept in the header (readable with :func:`read_header`).
    Returns the path. The previous file at ``path`` stays whole until the new
    one is complete and synced.
    """
    path = checked_path(path, "save_checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    tensors: list = []
    structure = _encode(state, tensors)
    codec, payload = _pack(tensors)
    header = json.dumps({"format": "stabilize-checkpoint", "version": FORMAT_VERSION, "codec": codec,
                         "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
                         "structure": structure, "meta": meta or {}}).encode()
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack(">Q", len(header)) + header)
            f.write(payload)
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
    return path


def _read(path) -> tuple[dict, bytes]:
    path = checked_path(path, "load_checkpoint")
    where = f"checkpoint {str(path)!r}"
    if not path.exists():
        raise CheckpointError(f"{where} does not exist")
    _sweep(path)
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{where} is not a stabilize checkpoint (no {MAGIC!r} signature)")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise CheckpointError(f"{where} is truncated: {len(data)} bytes, shorter than its own header")
    (hlen,) = struct.unpack(">Q", data[len(MAGIC):start])
    try:
        header = json.loads(data[start:start + hlen])
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is truncated or corrupted: its header is not valid JSON ({exc})") from exc
    if header.get("format") != "stabilize-checkpoint":
        raise CheckpointError(f"{where}: unknown format {header.get('format')!r}")
    if header.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{where} has format version {header.get('version')!r}; this stabilize reads "
                              f"version {FORMAT_VERSION}: load it with the version that wrote it")
    payload = data[start + hlen:]
    if len(payload) != header["payload_bytes"]:
        raise CheckpointError(f"{where} is truncated: {len(payload)} payload bytes of {header['payload_bytes']}")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CheckpointError(f"{where} is corrupted: the SHA-256 of its tensors does not match its header")
    return header, payload


def read_header(path) -> dict:
    """The verified header of a checkpoint (version, codec, sizes, ``meta``)."""
    header, _ = _read(path)
    return {k: v for k, v in header.items() if k != "structure"}


def load(path):
    """Read and verify a checkpoint; returns the saved state (torch tensors on CPU, numpy arrays).

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or of another format.
    """
    header, payload = _read(path)
    try:
        tensors = _unpack(header["codec"], payload, f"checkpoint {str(path)!r}")
    except CheckpointError:
        raise
    except Exception as exc:  # the checksum matched, so the writer itself wrote something unreadable
        raise CheckpointError(f"checkpoint {str(path)!r}: its tensors cannot be read ({type(exc).__name__}: "
                              f"{exc})") from exc
    return _decode(header["structure"], tensors)
