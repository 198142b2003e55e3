"""Lazy safetensors reading and atomic, sharded, order-free safetensors writing.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the
header), an optional ``"__metadata__"`` string map, then the raw little-endian tensor bytes.

Reading parses the header once and reads each tensor with ``os.preadv`` straight into a NumPy
buffer: no long-lived mmap (mapped pages would count in peak RSS) and no extra copy.
Writing plans every shard up front from the known layout, writes each file's header first and
then puts each tensor's bytes at its offset with ``os.pwrite`` -- tensors can arrive in any order
from any thread and memory stays bounded by one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import struct
import threading
from types import TracebackType
from typing import Any, Iterable, Sequence

import ml_dtypes
import numpy as np

from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, OutputExistsError
from .memory import HUGE_PAGE, anon_buffer

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "open_checkpoint",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit

_ST_TO_NP: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}



def _close_all(fds: list) -> list:
    """Close file descriptors, ignoring ones already closed; returns an empty list."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return []


def st_dtype_name(dtype: Any) -> str:
    """Safetensors dtype tag (``"BF16"``) of a NumPy dtype; raises CheckpointError if unsupported.

    References: the safetensors format (Hugging Face).
    """
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        raise CheckpointFormatError(f"big-endian dtype {dt} cannot be stored in safetensors; use {dt.newbyteorder('<')}")
    dt = dt.newbyteorder("=") if dt.byteorder == "<" else dt
    try:
        return _NP_TO_ST[dt]
    except KeyError:
        raise CheckpointFormatError(
            f"dtype {dt} has no safetensors equivalent; supported: {sorted(str(d) for d in _NP_TO_ST)}"
        ) from None


_HAVE_POSITIONAL_IO = hasattr(os, "preadv") and hasattr(os, "pwrite")
_O_BINARY = getattr(os, "O_BINARY", 0)
_SEEK_LOCK = threading.Lock()  # only for platforms without positional I/O (Windows)


def _pread(fd: int, buf: memoryview, offset: int) -> int:
    if _HAVE_POSITIONAL_IO:
        return os.preadv(fd, [buf], offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(buf))
    buf[: len(data)] = data
    return len(data)


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    if _HAVE_POSITIONAL_IO:
        return os.pwrite(fd, data, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def _pread_into(fd: int, buf: memoryview, offset: int, path: str, name: str) -> None:
    """Fill ``buf`` (a byte memoryview) from ``fd`` at ``offset``; error on a short read."""
    total = len(buf)
    done = 0
    while done < total:
        n = _pread(fd, buf[done:], offset + done)
        if n <= 0:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} is truncated: read {done} of {total} bytes at offset {offset} "
                "(the file shrank or is incomplete); re-download or re-save the checkpoint"
            )
        done += n


_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback():
    """``f(fd, offset, nbytes)`` starting the disk write of a file range without waiting for it (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the final ``fsync`` finds little left to write;
    None where that call is missing."""
    import sys  # noqa: PLC0415
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # noqa: PLC0415
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return lambda fd, off, n: f(fd, off, n, _SYNC_FILE_RANGE_WRITE)  # an error only loses the head start


_WRITEBACK = _start_writeback()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    total = len(data)
    while done < total:
        done += _pwrite(fd, data[done:], offset + done)


class _TensorInfo:
    __slots__ = ("file", "start", "end", "dtype", "shape")

    def __init__(self, file: int, start: int, end: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.file, self.start, self.end, self.dtype, self.shape = file, start, end, dtype, shape


def read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """Parse a safetensors header: returns (header dict, data start offset, file size).

    Raises:
      CheckpointError: missing file, bad length, bad JSON.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: safetensors file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFormatError(f"{path}: corrupt safetensors header: file has only {size} bytes (need >= 8)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointFormatError(
                f"{path}: corrupt safetensors header: declared header length {n} does not fit the file "
                f"size {size}; the file is truncated or not a safetensors file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: corrupt safetensors header: expected a JSON object")
    return header, 8 + n, size


class CheckpointReader:
    """Lazy reader of one checkpoint (HF dir, single .safetensors file, or Orbax dir).

    Tensors are read one at a time with :meth:`get`. Use as a context manager or call
    :meth:`close`. ``keys()`` lists names in storage order (shard by shard, by offset), which is
    the fastest order to read them in.

    Attributes:
      dir: the checkpoint directory (for a single file, its parent directory).
      config: the parsed ``config.json`` next to the weights, or None.
      metadata: the ``__metadata__`` map of the first safetensors file (or {}).

    References: the safetensors format (Hugging Face); Orbax (Google) for Orbax dirs.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        self.path = path
        self._fds: list[int] = []
        self._files: list[str] = []
        self._info: dict[str, _TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        if os.path.isdir(path):
            self.dir = path
            idx = os.path.join(path, INDEX_FILE)
            single = os.path.join(path, SINGLE_FILE)
            if os.path.isfile(idx):
                self._open_index(idx)
            elif os.path.isfile(single):
                self._open_files([single], None)
            else:
                cands = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
                if len(cands) == 1:
                    self._open_files([os.path.join(path, cands[0])], None)
                elif any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
                    raise CheckpointError(
                        f"{path}: only PyTorch pickle weights (.bin/.pt) found; jmerge reads safetensors only. "
                        "Re-save the model with `save_pretrained(..., safe_serialization=True)`"
                    )
                else:
                    raise CheckpointError(
                        f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found"
                        + (f" (found {len(cands)} .safetensors files but no index)" if cands else "")
                        + "; pass a HF model dir, a .safetensors file or an Orbax checkpoint dir"
                    )
        elif os.path.isfile(path):
            self.dir = os.path.dirname(os.path.abspath(path))
            self._open_files([path], None)
        else:
            raise CheckpointNotFoundError(f"{path}: checkpoint not found (no such file or directory)")
        self.config = _read_json_or_none(os.path.join(self.dir, "config.json"))

    # -- opening -----------------------------------------------------------------------------
    def _open_index(self, idx: str) -> None:
        try:
            with open(idx, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{idx}: corrupt index file ({e!r}); expected {{'weight_map': {{name: file}}}}") from None
        files = sorted(set(weight_map.values()))
        for fn in files:
            p = os.path.join(self.dir, fn)
            if not os.path.isfile(p):
                names = [k for k, v in weight_map.items() if v == fn]
                raise CheckpointError(
                    f"{idx}: shard {fn!r} named in the index is missing from {self.dir} "
                    f"(it holds {len(names)} tensors, e.g. {names[0]!r}); re-download the checkpoint"
                )
        self._open_files([os.path.join(self.dir, fn) for fn in files], weight_map)

    def _open_files(self, paths: list[str], weight_map: dict[str, str] | None) -> None:
        try:
            for fi, p in enumerate(paths):
                header, data_start, size = read_header(p)
                meta = header.pop("__metadata__", None)
                if fi == 0 and isinstance(meta, dict):
                    self.metadata = dict(meta)
                entries = []
                for name, e in header.items():
                    try:
                        dtag, shape, (b, t) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
                        b, t = int(b), int(t)
                    except (KeyError, TypeError, ValueError) as ex:
                        raise CheckpointFormatError(f"{p}: corrupt safetensors header entry for tensor {name!r}: {e!r} ({ex})") from None
                    if dtag not in _ST_TO_NP:
                        raise CheckpointError(
                            f"{p}: tensor {name!r} has unknown dtype {dtag!r}; supported: {sorted(_ST_TO_NP)}"
                        )
                    dt = _ST_TO_NP[dtag]
                    want = math.prod(shape) * dt.itemsize
                    if t - b != want or b < 0 or any(s < 0 for s in shape):
                        raise CheckpointFormatError(
                            f"{p}: tensor {name!r} header is inconsistent: shape {list(shape)} dtype {dtag} needs "
                            f"{want} bytes but data_offsets {[b, t]} span {t - b}; the file is corrupt"
                        )
                    if data_start + t > size:
                        raise CheckpointFormatError(
                            f"{p}: file is truncated: tensor {name!r} ends at byte {data_start + t} but the file has "
                            f"{size} bytes; re-download or re-save the checkpoint"
                        )
                    if weight_map is not None and weight_map.get(name, os.path.basename(p)) != os.path.basename(p):
                        continue  # the index assigns this name to another shard; trust the index
                    if name in self._info:
                        raise CheckpointFormatError(f"{p}: tensor {name!r} appears in two files ({self._files[self._info[name].file]})")
                    entries.append((b, name, _TensorInfo(fi, data_start + b, data_start + t, dt, shape)))
                entries.sort(key=lambda x: x[0])
                for _, name, info in entries:
                    self._info[name] = info
                self._files.append(p)
                self._fds.append(os.open(p, os.O_RDONLY | _O_BINARY))
            if weight_map is not None:
                missing = [k for k in weight_map if k not in self._info]
                if missing:
                    raise CheckpointFormatError(
                        f"{os.path.join(self.dir, weight_map[missing[0]])}: tensor {missing[0]!r} is listed in "
                        f"{INDEX_FILE} but absent from that shard ({len(missing)} missing); the checkpoint is corrupt"
                    )
        except BaseException:
            self.close()
            raise

    # -- queries -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in storage order."""
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)

    def _get_info(self, name: str) -> _TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise CheckpointNotFoundError(f"{self.path}: no tensor named {name!r} ({len(self._info)} tensors)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get_info(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._get_info(name).dtype

    def nbytes(self, name: str) -> int:
        i = self._get_info(name)
        return i.end - i.start

    def file_of(self, name: str) -> str:
        """Path of the file holding ``name``."""
        return self._files[self._get_info(name).file]

    def layout(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """``[(name, shape, dtype)]`` of all tensors (the input :class:`CheckpointWriter` takes)."""
        return [(k, i.shape, i.dtype) for k, i in self._info.items()]

    def get(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Read one tensor.

        Args:
          name: tensor name.
          out: optional C-contiguous, writeable buffer of exactly ``nbytes(name)`` bytes (any dtype and
            shape); the bytes land there and a view of it with the tensor's dtype and shape is returned.

        Returns:
          A new (or ``out``-backed) array with the stored dtype and shape.

        Safe to call from several threads at once (positional reads, no shared file offset).
        """
        info = self._get_info(name)
        return self._read(info, name, tuple(info.shape), info.start, out)

    def get_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read rows ``start:stop`` of one tensor (its leading axis): one positional read of their bytes.

        Args:
          name: tensor name (of at least one dimension).
          start, stop: the rows, ``0 <= start <= stop <= shape[0]``.
          out: as in :meth:`get`, of exactly the rows' bytes.

        Returns:
          An array of shape ``(stop - start, *shape[1:])`` and the stored dtype (``out``-backed when given).
        """
        info = self._get_info(name)
        if not info.shape or not 0 <= start <= stop <= info.shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r} of shape {info.shape} has no rows {start}:{stop}")
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        return self._read(info, name, (stop - start,) + tuple(info.shape[1:]), info.start + start * row, out,
                          f" rows {start}:{stop}")

    def get_flat(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Read entries ``start:stop`` of one tensor in flat (C) order: one positional read of their bytes.

        Args:
          name: tensor name.
          start, stop: the entries, ``0 <= start <= stop <= size``.
          out: as in :meth:`get`, of exactly the entries' bytes.

        Returns:
          A 1-D array of ``stop - start`` entries of the stored dtype (``out``-backed when given).
        """
        info = self._get_info(name)
        size = math.prod(info.shape)
        if not 0 <= start <= stop <= size:
            raise CheckpointError(f"{self.path}: tensor {name!r} of shape {info.shape} has no entries {start}:{stop}")
        return self._read(info, name, (stop - start,), info.start + start * info.dtype.itemsize, out,
                          f" entries {start}:{stop}")

    def _read(self, info: _TensorInfo, name: str, shape: tuple, offset: int, out: np.ndarray | None,
              part: str = "") -> np.ndarray:
        """The bytes of ``shape`` (``info``'s dtype) at file ``offset`` as an array, in ``out`` when given
        (:meth:`get`, :meth:`get_rows`, :meth:`get_flat`; ``part`` names the rows or entries in errors)."""
        if not self._fds:
            raise CheckpointError(f"{self.path}: reader is closed")
        if out is None:
            arr = np.empty(shape, info.dtype)
        else:
            if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable):
                raise CheckpointError(f"{self.path}: tensor {name!r}: `out` must be a writeable C-contiguous numpy array")
            nbytes = math.prod(shape) * info.dtype.itemsize
            if out.nbytes != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r}{part} has {nbytes} bytes (shape {shape} "
                    f"{info.dtype}) but `out` has {out.nbytes} bytes (shape {out.shape} {out.dtype})"
                )
            arr = out.reshape(-1).view(np.uint8).view(info.dtype).reshape(shape)
        if arr.nbytes:
            _pread_into(self._fds[info.file], memoryview(arr.reshape(-1).view(np.uint8)), offset,
                        self._files[info.file], name)
        return arr

    def rows_readable(self, name: str) -> bool:
        """Whether :meth:`get_rows` reads ``name`` (a tensor of at least one dimension; :meth:`get_flat` reads any)."""
        return len(self._get_info(name).shape) >= 1

    def __getitem__(self, name: str) -> np.ndarray:
        return self.get(name)

    def close(self) -> None:
        self._fds = _close_all(self._fds)

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self._info)} tensors)"


def _read_json_or_none(p: str) -> dict | None:
    if not os.path.isfile(p):
        return None
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{p}: invalid JSON ({e})") from None


_ORBAX_MARKERS = {"_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"}


def _orbax_dir(path: str) -> str | None:
    """``path`` itself, or its ``params``/``default`` item dir, when it holds an Orbax checkpoint."""
    if not os.path.isdir(path):
        return None
    if set(os.listdir(path)) & _ORBAX_MARKERS:
        return path
    for item in ("params", "default"):
        sub = os.path.join(path, item)
        if os.path.isdir(sub) and set(os.listdir(sub)) & _ORBAX_MARKERS:
            return sub
    return None


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a checkpoint for lazy, tensor-by-tensor reading.

    Args:
      path: a HF model dir (``model.safetensors`` or sharded with ``model.safetensors.index.json``),
        a single ``.safetensors`` file, or an Orbax checkpoint dir (as written by :func:`save_orbax`,
        or a CheckpointManager step dir whose ``params/`` or ``default/`` item holds the arrays).

    Returns:
      A :class:`CheckpointReader` (context manager).

    Raises:
      CheckpointError: missing dir/file/shard, tensor listed in the index but absent, truncated file,
        corrupt header, unknown dtype; the message names the file and the tensor.

    References: the safetensors format (Hugging Face); Orbax (Google) for Orbax dirs.
    """
    p = os.fspath(path)
    if os.path.isdir(p) and not os.path.isfile(os.path.join(p, INDEX_FILE)) \
            and not os.path.isfile(os.path.join(p, SINGLE_FILE)):
        ob = _orbax_dir(p)
        if ob is not None:
            from .orbax import OrbaxReader

            return OrbaxReader(ob)
    return CheckpointReader(p)


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


_DIO_BLOCK = 4096  # O_DIRECT alignment of offsets, lengths and memory (covers 512- and 4096-byte sectors)
_DIO_CHUNK = 32 * 2**20  # the aligned bounce buffer: one write of up to 32 MiB (a 1 GB output in 8 MiB writes: median
# pwrite 1.43 s against 0.97 s on a virtio disk, 14 runs each; fewer requests in flight)


class _Bounce:
    """The page-aligned bounce buffer of a writer's ``O_DIRECT`` files: one for all its shards, used under its
    lock, allocated at the first write with ``min(_DIO_CHUNK, largest file)`` bytes (huge pages from 2 MiB on)."""

    def __init__(self, largest: int):
        self.lock = threading.Lock()
        self.size = min(_DIO_CHUNK, -(-max(largest, 1) // _DIO_BLOCK) * _DIO_BLOCK)
        self._buf: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self._buf is None:
            if self.size >= HUGE_PAGE:
                self._buf = anon_buffer(self.size)  # 2 MiB-aligned, so aligned for O_DIRECT
            else:
                import mmap  # noqa: PLC0415
                self._buf = np.frombuffer(mmap.mmap(-1, self.size), np.uint8)  # page-aligned
        return self._buf


class _DirectFile:
    """Writes one shard's bytes with ``O_DIRECT``: no page-cache copy of the output (the device reads the
    data from an aligned bounce buffer), so no fresh page-cache pages per merge. Each write's whole aligned
    blocks go straight to the file; the partial blocks at its edges (shared with neighbouring tensors or the
    header) are assembled in memory and written, whole, by :meth:`finish`, so every byte of the file goes
    through ``O_DIRECT`` (never mixed with buffered writes of the same pages). :meth:`open` returns None where
    ``O_DIRECT`` is missing or refused (tmpfs, some network file systems): the writer then writes buffered."""

    def __init__(self, fd: int, size: int, bounce: _Bounce):
        self.fd, self.size = fd, size
        self.edges: dict[int, bytearray] = {}  # block number -> its bytes
        self.lock = threading.Lock()
        self.bounce = bounce

    @staticmethod
    def open(path: str, size: int, bounce: _Bounce) -> "_DirectFile | None":
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or not _HAVE_POSITIONAL_IO:
            return None
        try:
            fd = os.open(path, os.O_WRONLY | flag | _O_BINARY)
        except OSError:
            return None
        return _DirectFile(fd, size, bounce)

    def _edge(self, data: memoryview, off: int) -> None:
        """Copy ``data`` (within whole blocks' span, not filling them) into the assembled edge blocks."""
        while len(data):
            blk, at = divmod(off, _DIO_BLOCK)
            n = min(len(data), _DIO_BLOCK - at)
            b = self.edges.get(blk)
            if b is None:
                b = self.edges[blk] = bytearray(_DIO_BLOCK)
            b[at:at + n] = data[:n]
            data, off = data[n:], off + n

    def _direct(self, data, off: int) -> None:
        """``data`` (a multiple of the block size) at ``off`` (aligned), through the bounce buffer."""
        with self.bounce.lock:
            buf = self.bounce.get()
            for i in range(0, len(data), len(buf)):
                n = min(len(buf), len(data) - i)
                buf[:n] = np.frombuffer(data[i:i + n], np.uint8)
                _pwrite_all(self.fd, memoryview(buf[:n]), off + i)

    def write(self, data: memoryview, off: int) -> None:
        lo = -(-off // _DIO_BLOCK) * _DIO_BLOCK
        hi = (off + len(data)) // _DIO_BLOCK * _DIO_BLOCK
        with self.lock:
            if hi > lo:
                self._direct(data[lo - off:hi - off], lo)
                self._edge(data[:lo - off], off)
                self._edge(data[hi - off:], hi)
            else:
                self._edge(data, off)

    def finish(self) -> None:
        """Write the assembled edge blocks and restore the file's size (the last block may pass its end)."""
        with self.lock:
            for blk in sorted(self.edges):
                self._direct(memoryview(self.edges[blk]), blk * _DIO_BLOCK)
            self.edges.clear()
            os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        _close_all([self.fd])


def _shard_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _encode_header(entries: dict[str, Any]) -> bytes:
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)  # 8-byte alignment of the data section, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


class CheckpointWriter:
    """Atomic, sharded safetensors writer; tensors may be written in any order from any thread.

    The full ``layout`` is known up front, so shards are planned and every file's header and size
    are written at construction. :meth:`write` puts one tensor's bytes at its offset (``os.pwrite``),
    so memory stays bounded by one tensor. Everything goes into a temporary sibling directory
    ``.<name>.tmp-<pid>``; :meth:`commit` (or leaving the ``with`` block without an exception) checks
    that every tensor was written, writes ``model.safetensors.index.json`` when sharded, fsyncs and
    renames the directory to ``out_dir``. On an exception, or when :meth:`abort` is called, the
    temporary directory is removed and ``out_dir`` is left untouched. A process killed mid-write
    cannot clean up: its directory is owned by a marker file ``.<name>.tmp-<pid>-<id>.owner`` (pid,
    process start time, boot id, host), and the next writer into the same parent removes it once
    that process is gone (see :func:`sweep_abandoned`); a live run's directory is never touched.

    Args:
      out_dir: the output directory (must not exist unless ``overwrite``; replaced only at commit).
      layout: ``[(name, shape, dtype)]`` of every tensor, in the order they are stored.
      max_shard_bytes: start a new shard when the next tensor would exceed this (a single larger
        tensor gets its own shard). Shards follow HF naming ``model-00001-of-00003.safetensors``, or
        ``model.safetensors`` when there is one.
      overwrite: replace an existing ``out_dir`` at commit.
      metadata: extra ``__metadata__`` string entries (``{"format": "pt"}`` is always set, so
        transformers accepts the files).
      fsync: fsync the files and directories before the rename (durable on power loss; costs
        time proportional to the bytes on slow disks). The rename is atomic either way. With it, each
        tensor's disk write starts as soon as it is written (Linux ``sync_file_range``), overlapping
        the rest of the merge, so the final fsync finds little left to write.

    Thread safety: :meth:`write` may be called concurrently for different names; ``commit``/``abort``
    must be called once, after all writes returned.

    References: the safetensors format (Hugging Face) and its sharded index (``model.safetensors.index.json``).
    """

    def __init__(self, out_dir: str | os.PathLike, layout: Iterable[tuple[str, Sequence[int], Any]], *,
                 max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                 metadata: dict[str, str] | None = None, fsync: bool = True):
        self.fsync = fsync
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.overwrite = overwrite
        sweep_abandoned(os.path.dirname(self.out_dir))  # first: it may roll back a killed overwrite of out_dir
        if os.path.exists(self.out_dir) and not overwrite:
            raise OutputExistsError(f"{self.out_dir}: output already exists; pass overwrite=True to replace it")
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._lock = threading.Lock()
        self._done = False
        self._fds: list[int] = []
        self._direct: list[_DirectFile | None] = []  # per shard, with fsync: O_DIRECT writes where possible
        self._written: set[str] = set()
        self._rows: dict[str, list[tuple[int, int]]] = {}  # name -> entry ranges written so far (rows=/flat=)
        meta = {"format": "pt"}
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})

        # plan shards
        plan: list[list[tuple[str, tuple[int, ...], np.dtype, int]]] = [[]]
        cur = 0
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for entry in layout:
            name, shape, dtype = entry
            name = str(name)
            shape = tuple(int(s) for s in shape)
            dt = np.dtype(dtype)
            st_dtype_name(dt)
            if name in self._layout:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} appears twice in the layout")
            if name == "__metadata__":
                raise CheckpointError("'__metadata__' is reserved by safetensors and cannot be a tensor name")
            nb = math.prod(shape) * dt.itemsize
            if plan[-1] and cur + nb > max_shard_bytes:
                plan.append([])
                cur = 0
            plan[-1].append((name, shape, dt, nb))
            cur += nb
            self._layout[name] = (shape, dt)
        n = len(plan)
        self.shard_files = [_shard_name(i, n) for i in range(n)]
        self.total_size = sum(nb for shard in plan for *_, nb in shard)

        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp_dir, self._owner_file = _claim_tmp_dir(parent, os.path.basename(self.out_dir), f"{id(self):x}")
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd index, abs offset, nbytes)
        bounce = _Bounce(max(sum(nb for *_, nb in shard) for shard in plan) + 2**20)  # shared by the shards' files
        try:
            for si, shard in enumerate(plan):
                entries: dict[str, Any] = {"__metadata__": meta}
                off = 0
                for name, shape, dt, nb in shard:
                    entries[name] = {"dtype": st_dtype_name(dt), "shape": list(shape), "data_offsets": [off, off + nb]}
                    off += nb
                head = _encode_header(entries)
                path = os.path.join(self.tmp_dir, self.shard_files[si])
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
                self._fds.append(fd)
                os.ftruncate(fd, len(head) + off)
                direct = _DirectFile.open(path, len(head) + off, bounce) if fsync else None
                self._direct.append(direct)
                if direct is not None:
                    direct.write(memoryview(head), 0)
                else:
                    _pwrite_all(fd, memoryview(head), 0)
                base = len(head)
                for name, shape, dt, nb in shard:
                    self._where[name] = (si, base, nb)
                    base += nb
        except BaseException:
            self.abort()
            raise

    @property
    def names(self) -> list[str]:
        return list(self._layout)

    def weight_map(self) -> dict[str, str]:
        """``{tensor name: shard file}``."""
        return {k: self.shard_files[si] for k, (si, _, _) in self._where.items()}

    def _check_open(self) -> None:
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer already committed or aborted")

    def write(self, name: str, array: Any, rows: tuple[int, int] | None = None,
              flat: tuple[int, int] | None = None) -> None:
        """Write one tensor's bytes at its planned offset (any order, thread-safe).

        ``array`` (NumPy or JAX) must have the layout's shape; it is cast to the layout's dtype if it
        differs. Writing a name twice, or one not in the layout, raises CheckpointError.

        With ``rows=(start, stop)``, ``array`` is those rows of the tensor (its leading axis) and lands at
        their place; with ``flat=(start, stop)``, it is those entries of the tensor in flat (C) order, as a
        1-D array. The tensor counts as written once its blocks cover it. A block that overlaps one already
        written raises CheckpointError.
        """
        self._check_open()
        try:
            whole, dt = self._layout[name]
        except KeyError:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} is not in the writer's layout") from None
        if rows is not None and flat is not None:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r}: give rows or flat, not both")
        size = math.prod(whole)
        shape, part, e0, e1 = whole, "", 0, size  # the entries written, in flat order
        if rows is not None:
            r0, r1 = (int(r) for r in rows)
            if not whole or not 0 <= r0 < r1 <= whole[0]:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} of shape {whole} has no rows {r0}:{r1}")
            shape, part = (r1 - r0,) + whole[1:], f"rows {r0}:{r1}"
            e0, e1 = r0 * (size // whole[0]), r1 * (size // whole[0])
        elif flat is not None:
            e0, e1 = (int(e) for e in flat)
            if not 0 <= e0 < e1 <= size:
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} of shape {whole} has no entries {e0}:{e1}")
            shape, part = (e1 - e0,), f"entries {e0}:{e1}"
        arr = np.asarray(array)
        if tuple(arr.shape) != shape:
            raise CheckpointError(
                f"{self.out_dir}: tensor {name!r} has shape {tuple(arr.shape)} but the layout says {shape}"
                + (f" ({part} of {whole})" if part else "")
            )
        if arr.dtype != dt:
            arr = arr.astype(dt)
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        block = rows is not None or flat is not None
        with self._lock:
            if name in self._written or (not block and self._rows.get(name)):
                raise CheckpointError(f"{self.out_dir}: tensor {name!r} written twice")
            if not block:
                self._written.add(name)
            else:
                done = self._rows.setdefault(name, [])
                if any(a < e1 and e0 < b for a, b in done):
                    raise CheckpointError(f"{self.out_dir}: tensor {name!r}: {part} written twice")
                done.append((e0, e1))
                if sum(b - a for a, b in done) == size:
                    self._written.add(name)
        si, off, nb = self._where[name]
        if block:
            off, nb = off + e0 * dt.itemsize, (e1 - e0) * dt.itemsize
        try:
            if nb:
                data = memoryview(arr.reshape(-1).view(np.uint8))
                if self._direct[si] is not None:
                    self._write_direct(si, data, off)
                else:
                    _pwrite_all(self._fds[si], data, off)
                    if self.fsync and _WRITEBACK is not None:  # the disk writes while the merge goes on
                        _WRITEBACK(self._fds[si], off, nb)
        except BaseException:
            with self._lock:
                self._written.discard(name)
                if block:
                    self._rows[name].remove((e0, e1))
            raise

    def _write_direct(self, si: int, data: memoryview, off: int) -> None:
        d = self._direct[si]
        try:
            d.write(data, off)
        except OSError as e:
            import errno  # noqa: PLC0415
            if e.errno != errno.EINVAL:
                raise
            self._buffered(si)  # O_DIRECT refused for this file: everything from here on is buffered
            _pwrite_all(self._fds[si], data, off)

    def _buffered(self, si: int) -> None:
        """Switch shard ``si`` to buffered writes: its assembled edge blocks are written buffered first."""
        d = self._direct[si]
        if d is None:
            return
        with d.lock:
            self._direct[si] = None
            for blk in sorted(d.edges):  # only bytes written so far: unwritten ones are zeros, written later
                b = d.edges[blk]
                end = min(len(b), max(d.size - blk * _DIO_BLOCK, 0))
                _pwrite_all(self._fds[si], memoryview(b)[:end], blk * _DIO_BLOCK)
            d.edges.clear()
            d.close()

    def _finish_direct(self) -> None:
        for si, d in enumerate(self._direct):
            if d is None:
                continue
            try:
                d.finish()
            except OSError as e:
                import errno  # noqa: PLC0415
                if e.errno != errno.EINVAL:
                    raise
                self._buffered(si)
            else:
                d.close()
                self._direct[si] = None

    def missing(self) -> list[str]:
        """Names in the layout not written yet."""
        with self._lock:
            return [k for k in self._layout if k not in self._written]

    def _aux_path(self, relname: str) -> str:
        rel = os.path.normpath(relname)
        if os.path.isabs(rel) or rel.startswith(".."):
            raise CheckpointError(f"aux file name {relname!r} must be relative and inside the output dir")
        if rel in self.shard_files or (rel == INDEX_FILE and len(self.shard_files) > 1):
            raise CheckpointError(f"aux file name {relname!r} collides with a weights file")
        p = os.path.join(self.tmp_dir, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def add_file(self, src: str | os.PathLike, relname: str | None = None) -> None:
        """Copy ``src`` into the output as ``relname`` (default: its basename)."""
        self._check_open()
        src = os.fspath(src)
        shutil.copyfile(src, self._aux_path(relname or os.path.basename(src)))

    def write_text(self, relname: str, text: str) -> None:
        """Write a text file (UTF-8) into the output."""
        self._check_open()
        with open(self._aux_path(relname), "w", encoding="utf-8") as f:
            f.write(text)

    def commit(self) -> str:
        """Verify, finalize and atomically move the output into place; returns ``out_dir``."""
        self._check_open()
        try:
            miss = self.missing()
            if miss:
                raise CheckpointError(
                    f"{self.out_dir}: {len(miss)} tensors were never written (e.g. {miss[0]!r}); output discarded"
                )
            if len(self.shard_files) > 1:
                index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map()}
                with open(os.path.join(self.tmp_dir, INDEX_FILE), "w", encoding="utf-8") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
            self._finish_direct()
            if self.fsync:
                for fd in self._fds:
                    os.fsync(fd)
            self._close_fds()
            if self.fsync:
                _fsync_tree(self.tmp_dir)
            _atomic_replace_dir(self.tmp_dir, self.out_dir, self.overwrite, old=_old_dir_of(self.tmp_dir))
            self._done = True
            _unlink_quiet(self._owner_file)
            return self.out_dir
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written; ``out_dir`` is not created or changed."""
        self._done = True
        self._close_fds()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if not os.path.lexists(self.tmp_dir):
            _unlink_quiet(self._owner_file)

    def _close_fds(self) -> None:
        self._fds = _close_all(self._fds)
        for d in getattr(self, "_direct", ()):
            if d is not None:
                d.close()
        self._direct = []

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._done:
            return
        if exc_type is not None:
            self.abort()
        else:
            self.commit()

    def __del__(self) -> None:
        try:
            if not self._done and hasattr(self, "tmp_dir"):
                self.abort()
        except Exception:
            pass


def _fsync_tree(d: str) -> None:
    for root, _, files in os.walk(d):
        for fn in files:
            fd = os.open(os.path.join(root, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_replace_dir(tmp: str, out: str, overwrite: bool, old: str | None = None) -> None:
    """Rename ``tmp`` to ``out``; with ``overwrite`` an existing ``out`` is swapped out first (to ``old``)."""
    parent = os.path.dirname(out)
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(f"{out}: output appeared while writing; pass overwrite=True to replace it")
        old = old or os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}-{id(tmp):x}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)
    else:
        os.rename(tmp, out)
    _fsync_dir(parent)


# --- temporary directories of killed runs -------------------------------------------------------------------------
# A writer first creates ``.<name>.tmp-<pid>-<id>.owner`` (JSON: pid, process start time, boot id, host, pid
# namespace), then the directory ``.<name>.tmp-<pid>-<id>``; the marker is removed last (after the rename into
# place, or the removal on abort). A marker whose process is gone therefore names everything a killed run left.

_OWNER_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)\.owner$")


def _read_small(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096).strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, start time in clock ticks since boot)`` of a process from ``/proc``, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        rest = data[data.rindex(b")") + 2:].split()  # fields 3.. (the command name may contain spaces)
        return rest[0].decode("ascii", "replace"), int(rest[19])
    except (OSError, ValueError, IndexError):
        return None


def _pidns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner_record() -> dict:
    """This process's identity, as written into an owner marker."""
    st = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "start": st[1] if st else None, "boot": _read_small(_BOOT_ID),
            "host": socket.gethostname(), "pidns": _pidns()}


_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return True
    return True


def _owner_gone(rec: dict, me: dict) -> bool:
    """Whether the process that wrote the marker ``rec`` has certainly exited (``me``: this process's record).

    Unknown means alive: a marker from another host, or from another pid namespace since this boot, is never
    judged (a shared file system).
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int) or rec.get("host") != me["host"]:
        return False
    if rec.get("boot") and me["boot"] and rec["boot"] != me["boot"]:
        return True  # written before this machine last booted
    if rec.get("pidns") != me["pidns"]:
        return False  # another container's processes: not visible from here
    pid = rec["pid"]
    if pid <= 0:
        return False
    if os.path.isdir("/proc/self"):
        st = _proc_stat(pid)
        if st is None:
            return not os.path.exists(f"/proc/{pid}")
        state, start = st
        if state in ("Z", "X"):  # exited; only its parent has not reaped it yet
            return True
        return rec.get("start") is not None and start != rec["start"]  # the pid now belongs to another process
    return not _pid_alive(pid)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _old_dir_of(tmp_dir: str) -> str:
    """Where :func:`_atomic_replace_dir` parks a replaced output: ``.<name>.old-<pid>-<id>`` beside ``tmp_dir``."""
    head, _, tail = os.path.basename(tmp_dir).rpartition(".tmp-")
    return os.path.join(os.path.dirname(tmp_dir), f"{head}.old-{tail}")


def _claim_tmp_dir(parent: str, name: str, token: str) -> tuple[str, str]:
    """Create the owner marker, then the temporary directory; returns both paths."""
    stem = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{token}")
    owner = stem + ".owner"
    fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o644)
    try:
        os.write(fd, json.dumps(_owner_record()).encode("utf-8"))
    finally:
        os.close(fd)
    try:
        os.makedirs(stem)
    except BaseException:
        _unlink_quiet(owner)
        raise
    return stem, owner


def sweep_abandoned(parent: str | os.PathLike) -> list[str]:
    """Remove what killed writers left in ``parent``: temporary output directories of processes that are gone.

    Every :class:`CheckpointWriter` calls this on its output's parent before it starts. Only directories
    with an owner marker (``.<name>.tmp-<pid>-<id>.owner``, written before the directory) are considered,
    and only when the marker's process has exited: the pid is not running, is a zombie, or now belongs to a
    process with another start time (pid reuse), or the machine has rebooted since. Markers from another
    host or pid namespace (a shared file system) are left alone, as are the directories of live runs. A run
    killed between the two renames of an ``overwrite`` commit is rolled back: its parked previous output
    (``.<name>.old-<pid>-<id>``) is renamed back to ``<name>``. Errors (permissions, a concurrent sweep)
    are ignored.

    Returns:
      The paths removed or restored.

    References: none (infrastructure).
    """
    parent = os.fspath(parent)
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    me: dict | None = None
    done: list[str] = []
    for entry in entries:
        m = _OWNER_RE.match(entry)
        if m is None:
            continue
        owner = os.path.join(parent, entry)
        text = _read_small(owner)
        try:
            rec = json.loads(text) if text else None
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or rec.get("pid") != int(m.group("pid")):
            continue  # unreadable or not a writer's marker: never judged
        me = me or _owner_record()
        if not _owner_gone(rec, me):
            continue
        tmp = owner[: -len(".owner")]
        out = os.path.join(parent, m.group("name"))
        old = _old_dir_of(tmp)
        try:
            if os.path.isdir(old) and not os.path.islink(old):
                if os.path.lexists(tmp) and not os.path.lexists(out):
                    os.rename(old, out)  # killed between the two renames of an overwrite: undo the first
                else:
                    shutil.rmtree(old, ignore_errors=True)
                done.append(old)
            if os.path.lexists(tmp):
                if os.path.isdir(tmp) and not os.path.islink(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    os.unlink(tmp)
                done.append(tmp)
            if not os.path.lexists(tmp) and not os.path.lexists(old):
                _unlink_quiet(owner)
        except OSError:
            continue
    return done
