"""Where a method's time goes on one leaf: the time of each compiled kernel (XLA fusion, loop, conditional).

Merges one ``(1024, 2816)`` float32 leaf (a Llama-like MLP matrix; base ~ N(0, 1), 3 fine-tunes at
``base + 0.01 N(0, 1)``) with each method given, under ``jax.profiler.trace``, and prints the per-call time
of every thunk the CPU runtime executed, largest first. A kernel that writes a leaf-sized buffer to fresh
pages shows as a few ms where reading the inputs once takes ~1 ms. The trace (``.xplane.pb``) is decoded
here with a minimal protobuf wire-format reader (no TensorBoard needed).

    python scripts/profile_leaf.py "sce(density=0.5)" "ties()" --top 15

The names are those of the compiled HLO (``jax.jit(f).lower(...).compile().as_text()``); the leaf-sized
buffers a program writes are listed by ``tests/test_xla_workarounds.py``'s ``_full_size_buffers``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jmerge


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _fields(b: bytes) -> list:
    """(field number, value) pairs of one protobuf message; length-delimited values as bytes."""
    i, out = 0, []
    while i < len(b):
        key, i = _varint(b, i)
        f, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((f, v))
    return out


def event_times(path: str) -> tuple[dict, collections.Counter]:
    """Total duration (s) and count of each event name in an XSpace file (XSpace.planes = 1; XPlane.lines
    = 3, event_metadata = 4 (map id -> XEventMetadata, whose name = 2); XLine.events = 4; XEvent
    metadata_id = 1, duration_ps = 3)."""
    total, count = collections.defaultdict(float), collections.Counter()
    for f, plane in _fields(open(path, "rb").read()):
        if f != 1:
            continue
        fields = _fields(plane)
        names = {}
        for g, v in fields:
            if g == 4:
                entry = dict(_fields(v))
                meta = dict(_fields(entry[2])) if 2 in entry else {}
                names[entry.get(1, 0)] = meta.get(2, b"").decode(errors="replace")
        for g, line in fields:
            if g != 3:
                continue
            for h, ev in _fields(line):
                if h == 4:
                    e = dict(_fields(ev))
                    name = names.get(e.get(1, 0), "?")
                    total[name] += e.get(3, 0) / 1e12
                    count[name] += 1
    return total, count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help='factory calls of jmerge, e.g. "ties(density=0.2)"')
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--models", type=int, default=3, help="fine-tuned models merged (Arcee Fusion takes 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    base = jnp.asarray(rng.standard_normal((1024, 2816)).astype(np.float32))
    models = [base + 0.01 * jnp.asarray(rng.standard_normal(base.shape).astype(np.float32)) for _ in range(args.models)]
    for spec in args.methods:
        method = eval("jmerge." + spec, {"jmerge": jmerge})
        run = lambda: jmerge.merge(method, {"w": base}, [{"w": m} for m in models])
        for _ in range(3):
            jax.block_until_ready(run())
        d = tempfile.mkdtemp(prefix="jmerge-profile-")
        try:
            with jax.profiler.trace(d):
                for _ in range(args.repeat):
                    jax.block_until_ready(run())
            total, count = event_times(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        finally:
            shutil.rmtree(d, ignore_errors=True)
        print(f"{spec}: ms per merge (calls per merge), {args.repeat} merges")
        kernels = {k: v for k, v in total.items() if not k.startswith(("$", "ThunkExecutor", "PjitFunction",
                                                                        "CommonPjRt"))}
        for name, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {t / args.repeat * 1e3:8.2f} ms  ({count[name] / args.repeat:4.1f})  {name[:100]}")


if __name__ == "__main__":
    main()
