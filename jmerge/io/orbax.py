"""Orbax save/load and HF safetensors <-> Orbax conversion.

Layout choice: an Orbax checkpoint written by jmerge holds a *nested* dict, made by splitting HF
tensor names on ``'.'`` (``model.layers.0.mlp.up_proj.weight`` ->
``{"model": {"layers": {"0": {"mlp": {"up_proj": {"weight": ...}}}}}}``), which is what JAX/Flax
code expects. :func:`nested_to_flat` joins the keys back. Next to Orbax's own files, the checkpoint
dir holds ``jmerge_checkpoint.json`` (the original flat tensor order and safetensors metadata) and
any config/tokenizer files, so Orbax -> safetensors restores the same names in the same order with
the same bytes (bit-exact for every dtype) and a dir that transformers loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from .auxfiles import copy_aux_files
from .errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError, OutputExistsError
from .safetensors import (
    CheckpointReader,
    CheckpointWriter,
    _atomic_replace_dir,
    _fsync_tree,
    open_checkpoint,
)

__all__ = ["save_orbax", "load_orbax", "convert", "flat_to_nested", "nested_to_flat"]

META_FILE = "jmerge_checkpoint.json"


def flat_to_nested(d: Mapping[str, Any], sep: str = ".") -> dict:
    """``{"a.b": x, "a.c": y}`` -> ``{"a": {"b": x, "c": y}}``.

    Raises:
      CheckpointError: a name is both a leaf and a prefix of another name (``a.b`` and ``a.b.c``),
        or has an empty component.

    References: the safetensors format's flat tensor names (Hugging Face); Orbax's nested pytrees (Google).
    """
    out: dict = {}
    for name, v in d.items():
        parts = str(name).split(sep)
        if any(p == "" for p in parts):
            raise CheckpointError(f"tensor name {name!r} has an empty component; cannot nest it on {sep!r}")
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise CheckpointError(
                    f"tensor name {name!r} conflicts with tensor {sep.join(parts[:i + 1])!r}: a name cannot be both "
                    "a tensor and a prefix of another tensor's name"
                )
            node = nxt
        if parts[-1] in node:
            raise CheckpointError(
                f"tensor name {name!r} conflicts with other tensors under it (or is duplicated); cannot nest"
            )
        node[parts[-1]] = v
    return out


def nested_to_flat(tree: Any, sep: str = ".") -> dict[str, Any]:
    """Inverse of :func:`flat_to_nested` for any pytree: ``{dotted path: leaf}`` in JAX leaf order.

    References: the safetensors format's flat tensor names (Hugging Face); Orbax's nested pytrees (Google).
    """
    import jax

    from ..core import path_str

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for kp, leaf in flat:
        name = path_str(kp) if sep == "." else sep.join(path_str(kp).split("."))
        out[name] = leaf
    return out


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _staging_dir(path: str) -> str:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=parent)


def _save_orbax_dir(params: Any, path: str, *, overwrite: bool, extra=None) -> str:
    """Save ``params`` into a staging dir, let ``extra(staging)`` add files, then rename atomically."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"{path}: output already exists; pass overwrite=True to replace it")
    # Orbax writes its own ``<dir>.orbax-checkpoint-tmp`` next to the target: keep both inside one
    # private staging dir so that a failure leaves nothing behind.
    root = _staging_dir(path)
    stage = os.path.join(root, "ckpt")
    try:
        ocp = _ocp()
        ocp.PyTreeCheckpointer().save(stage, args=ocp.args.PyTreeSave(params))
        if extra is not None:
            extra(stage)
        _fsync_tree(stage)
        _atomic_replace_dir(stage, path, overwrite)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return path


def save_orbax(params: Any, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Save a params pytree (NumPy or JAX arrays, possibly sharded) as an Orbax checkpoint, atomically.

    Orbax writes into a staging sibling dir ``.<name>.tmp-<pid>`` that is renamed to ``path`` only
    after the save completed; a failed save removes it, so no complete-looking output is left.

    Args:
      params: the pytree (nested dicts of arrays; use :func:`flat_to_nested` for dotted names).
      path: the checkpoint dir.
      overwrite: replace an existing ``path`` (only once the new checkpoint is complete).

    Returns:
      The absolute checkpoint path.

    References: Orbax (Google).
    """
    return _save_orbax_dir(params, os.fspath(path), overwrite=overwrite)


def _metadata_tree(path: str):
    ckpt = _ocp().PyTreeCheckpointer()
    meta = ckpt.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def load_orbax(path: str | os.PathLike, *, target: Any = None, shardings: Any = None) -> Any:
    """Restore an Orbax checkpoint.

    Args:
      path: the checkpoint dir.
      target: optional pytree of arrays or ``jax.ShapeDtypeStruct`` (with ``sharding``) giving the
        structure, dtypes and placement to restore to; ``jax.Array`` leaves keep their sharding.
      shardings: optional pytree of ``jax.sharding.Sharding`` (same structure as the checkpoint, e.g.
        ``NamedSharding`` on a mesh), or one Sharding for every leaf: leaves are restored as
        ``jax.Array`` placed with them (each host reads only its shards).

    Returns:
      The params pytree: NumPy arrays when neither ``target`` nor ``shardings`` is given, else
      ``jax.Array`` leaves placed as asked.

    Raises:
      CheckpointError: the path is missing or not an Orbax checkpoint.

    References: Orbax (Google).
    """
    import jax

    ocp = _ocp()
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: Orbax checkpoint not found")
    try:
        meta = _metadata_tree(path)
    except Exception as e:  # orbax raises various types for a dir that is not a checkpoint
        raise CheckpointFormatError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
    ckpt = ocp.PyTreeCheckpointer()
    if target is None and shardings is None:
        ra = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=ra))
    if target is None:
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda m: shardings, meta)
        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s), meta, shardings)
    elif shardings is not None:
        if isinstance(shardings, jax.sharding.Sharding):
            shardings = jax.tree.map(lambda t: shardings, target)
        target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(tuple(t.shape), t.dtype, sharding=s),
                              target, shardings)

    def _arg(t):
        if isinstance(t, (jax.Array, jax.ShapeDtypeStruct)) and getattr(t, "sharding", None) is not None:
            return ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=tuple(t.shape), dtype=t.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=getattr(t, "dtype", None))

    ra = jax.tree.map(_arg, target)
    try:
        return ckpt.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=ra))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore onto the given target/shardings: {e}") from None


class OrbaxReader(CheckpointReader):
    """:class:`CheckpointReader` over an Orbax checkpoint (flat dotted names).

    Shapes and dtypes come from Orbax metadata without reading data; :meth:`get` restores one
    array with an Orbax partial restore (a few ms of overhead per tensor), so memory stays bounded
    by one tensor as with safetensors.
    """

    def __init__(self, path: str):  # noqa: D107 -- no super().__init__: no safetensors files
        self.path = os.path.abspath(path)
        self.dir = self.path
        self._fds = []
        self._files = [self.path]
        try:
            meta = _metadata_tree(self.path)
        except Exception as e:
            raise CheckpointFormatError(f"{self.path}: not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
        flat = nested_to_flat(meta)
        side = _read_meta(self.path)
        order = [k for k in side.get("keys", []) if k in flat]
        order += [k for k in flat if k not in set(order)]
        self._meta = {k: (tuple(int(s) for s in flat[k].shape), np.dtype(flat[k].dtype)) for k in order}
        self.metadata = dict(side.get("metadata", {}))
        cfg = os.path.join(self.path, "config.json")
        self.config = json.load(open(cfg, encoding="utf-8")) if os.path.isfile(cfg) else None
        self._closed = False

    def keys(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def _m(self, name: str):
        try:
            return self._meta[name]
        except KeyError:
            raise CheckpointNotFoundError(f"{self.path}: no tensor named {name!r} ({len(self._meta)} tensors)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._m(name)[0]

    def dtype(self, name: str) -> np.dtype:
        return self._m(name)[1]

    def nbytes(self, name: str) -> int:
        s, d = self._m(name)
        return int(np.prod(s, dtype=np.int64)) * d.itemsize

    def file_of(self, name: str) -> str:
        self._m(name)
        return self.path

    def layout(self):
        return [(k, s, d) for k, (s, d) in self._meta.items()]

    def get(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        shape, dt = self._m(name)
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed")
        arr = self._restore_one(name, shape, dt)
        if out is None:
            return arr
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous and out.flags.writeable) or out.nbytes != arr.nbytes:
            raise CheckpointError(
                f"{self.path}: tensor {name!r}: `out` must be a writeable C-contiguous array of {arr.nbytes} bytes")
        view = out.reshape(-1).view(np.uint8).view(dt).reshape(shape)
        view[...] = arr
        return view

    def _restore_one(self, name: str, shape, dt) -> np.ndarray:
        ocp = _ocp()
        item = flat_to_nested({name: 0})
        ra = flat_to_nested({name: ocp.RestoreArgs(restore_type=np.ndarray)})
        try:
            got = ocp.PyTreeCheckpointer().restore(
                self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=ra, partial_restore=True))
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None
        arr = np.asarray(nested_to_flat(got)[name])
        if arr.shape != shape or arr.dtype != dt:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} restored as {arr.shape} {arr.dtype}, metadata says {shape} {dt}")
        return np.ascontiguousarray(arr)

    def close(self) -> None:
        self._closed = True

    def __del__(self) -> None:
        pass


def _read_meta(path: str) -> dict:
    p = os.path.join(path, META_FILE)
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str = "orbax", overwrite: bool = False,
            max_shard_bytes: int = 5 * 2**30) -> str:
    """Convert between HF safetensors and Orbax, bit-exact, copying config/tokenizer files along.

    Args:
      src: a HF model dir / .safetensors file (for ``to="orbax"``) or an Orbax checkpoint dir
        (for ``to="safetensors"``; an Orbax dir written by other code works too, names are the dotted
        leaf paths).
      dst: output dir, written atomically.
      to: ``"orbax"`` (nested dict by splitting names on '.') or ``"safetensors"``.
      overwrite: replace an existing ``dst``.
      max_shard_bytes: shard size for safetensors output.

    Returns:
      The output path.

    References: the safetensors format (Hugging Face); Orbax (Google).
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if to not in ("orbax", "safetensors"):
        raise OutputExistsError(f"convert: `to` must be 'orbax' or 'safetensors', got {to!r}")
    if os.path.exists(dst) and not overwrite:
        raise OutputExistsError(f"{dst}: output already exists; pass overwrite=True to replace it")
    with open_checkpoint(src) as r:
        src_dir = r.dir
        if to == "orbax":
            flat = {k: r.get(k) for k in r.keys()}
            side = {"format": "jmerge-orbax", "keys": list(flat), "metadata": dict(r.metadata)}

            class _Adder:
                def __init__(self, d):
                    self.d = d

                def add_file(self, s, rel):
                    shutil.copyfile(s, os.path.join(self.d, rel))

            def extra(stage: str) -> None:
                with open(os.path.join(stage, META_FILE), "w", encoding="utf-8") as f:
                    json.dump(side, f)
                if os.path.isdir(src_dir):
                    copy_aux_files(src_dir, _Adder(stage), card=True)

            return _save_orbax_dir(flat_to_nested(flat), dst, overwrite=overwrite, extra=extra)
        meta = {k: v for k, v in r.metadata.items() if k != "format"}
        with CheckpointWriter(dst, r.layout(), max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                              metadata=meta) as w:
            for k in r.keys():
                w.write(k, r.get(k))
            copy_aux_files(src_dir, w, card=True)
    return dst
