"""A small vision transformer for 8x8 digits (Flax linen) and its jitted training loops.

The backbone (patch embedding, transformer blocks, final norm; mean-pooled output) is kept apart
from the classification heads: heads are per task, and only backbones are merged, as in the CLIP
merging benchmarks. All heads have ``MAX_CLASSES`` outputs; a per-task class mask sets the logits of
classes a task does not have to a large negative value, so every task shares one compiled program.

Task heads are CLIP-like cosine classifiers: ``logits = temperature * normalize(features) @ W + b``
with ``W``'s columns the unit-norm class prototypes of the *pretrained* features
(:func:`prototype_heads`); they stay frozen while the backbone is fine-tuned, as CLIP's zero-shot
text heads do in the merging papers, so one head per task reads every backbone (pretrained,
fine-tuned, merged). Pretraining uses a plain trainable linear head (:func:`linear_logits`).

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(ICML 2021); Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ModelConfig", "Backbone", "init_backbone", "init_head", "features", "logits", "linear_logits",
           "prototype_heads", "class_mask", "train_loop", "train_multitask", "train_probes", "accuracy",
           "MAX_CLASSES"]

MAX_CLASSES = 10
NEG = -1e9


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Width, depth, heads and patch size of the backbone; ``temperature`` of the cosine task heads.

    References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).
    """

    width: int = 64
    depth: int = 4
    heads: int = 4
    patch: int = 2
    mlp_ratio: int = 2
    temperature: float = 30.0


def _modules():
    import flax.linen as nn

    class Block(nn.Module):
        width: int
        heads: int
        mlp_ratio: int

        @nn.compact
        def __call__(self, h):
            y = nn.LayerNorm(name="ln1")(h)
            h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
            y = nn.LayerNorm(name="ln2")(h)
            y = nn.Dense(self.width * self.mlp_ratio, name="fc1")(y)
            y = nn.Dense(self.width, name="fc2")(nn.gelu(y))
            return h + y

    class Backbone(nn.Module):
        cfg: ModelConfig

        @nn.compact
        def __call__(self, x):  # x: (N, 64) in [0, 1]
            c = self.cfg
            p = c.patch
            n = x.shape[0]
            img = x.reshape(n, 8 // p, p, 8 // p, p).transpose(0, 1, 3, 2, 4)
            tokens = img.reshape(n, (8 // p) ** 2, p * p)
            h = nn.Dense(c.width, name="embed")(tokens)
            pos = self.param("pos", nn.initializers.normal(0.02), (tokens.shape[1], c.width))
            h = h + pos[None]
            for i in range(c.depth):
                h = Block(c.width, c.heads, c.mlp_ratio, name=f"layers_{i}")(h)
            h = nn.LayerNorm(name="final_ln")(h)
            return h.mean(axis=1)

    return Backbone


_BACKBONES: dict = {}


def Backbone(cfg: ModelConfig):
    """The linen backbone module for ``cfg`` (built lazily so importing this file stays light)."""
    if cfg not in _BACKBONES:
        _BACKBONES[cfg] = _modules()(cfg)
    return _BACKBONES[cfg]


def init_backbone(cfg: ModelConfig, key) -> dict:
    return Backbone(cfg).init(key, jnp.zeros((1, 64), jnp.float32))["params"]


def init_head(cfg: ModelConfig, key, scale: float = 0.0) -> dict:
    return {"w": scale * jax.random.normal(key, (cfg.width, MAX_CLASSES), jnp.float32),
            "b": jnp.zeros((MAX_CLASSES,), jnp.float32)}


def features(cfg: ModelConfig, backbone, x):
    return Backbone(cfg).apply({"params": backbone}, x)


def class_mask(num_classes: int) -> np.ndarray:
    """``(MAX_CLASSES,)`` float32 additive logit mask: 0 for the task's classes, -1e9 otherwise."""
    m = np.full((MAX_CLASSES,), NEG, np.float32)
    m[:num_classes] = 0.0
    return m


def _unit(f, axis=-1):
    return f / jnp.sqrt(jnp.sum(f * f, axis=axis, keepdims=True) + 1e-12)


def logits(cfg: ModelConfig, backbone, head, x, mask):
    """Cosine task head: ``temperature * unit(features(x)) @ head["w"] + head["b"] + mask``.

    References: Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (ICML 2021).
    """
    return cfg.temperature * _unit(features(cfg, backbone, x)) @ head["w"] + head["b"] + mask


def linear_logits(cfg: ModelConfig, backbone, head, x, mask):
    """Plain linear head ``features(x) @ head["w"] + head["b"] + mask`` (pretraining).

    References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).
    """
    return features(cfg, backbone, x) @ head["w"] + head["b"] + mask


def prototype_heads(cfg: ModelConfig, backbone, xs, ys, num_classes) -> dict:
    """Frozen cosine heads from the pretrained features: column ``c`` of task ``t`` is the unit-norm mean
    of the unit-norm features of task ``t``'s class-``c`` inputs (absent classes: zero columns).

    Args:
      cfg: model config.
      backbone: the pretrained backbone params.
      xs: ``(T, N, 64)`` inputs; ys: ``(T, N)`` labels; num_classes: classes per task.

    Returns:
      ``{"w": (T, width, MAX_CLASSES), "b": (T, MAX_CLASSES)}`` (float32).

    References: Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (ICML 2021) (class embeddings as a frozen zero-shot head); Mensink et al.,
    "Distance-Based Image Classification" (TPAMI 2013) (nearest class mean).
    """
    f = np.asarray(jax.vmap(lambda x: _unit(features(cfg, backbone, x)))(jnp.asarray(xs)))
    ys = np.asarray(ys)
    w = np.zeros((f.shape[0], cfg.width, MAX_CLASSES), np.float32)
    for t in range(f.shape[0]):
        for c in range(int(num_classes[t])):
            sel = ys[t] == c
            if sel.any():
                mu = f[t][sel].mean(axis=0)
                w[t, :, c] = mu / max(float(np.linalg.norm(mu)), 1e-12)
    return {"w": jnp.asarray(w), "b": jnp.zeros((f.shape[0], MAX_CLASSES), jnp.float32)}


def _xent(lg, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), y[:, None], axis=1))


def _augment(key, x, noise: float):
    """Random translation by up to one pixel (zero padding) and Gaussian pixel noise."""
    n = x.shape[0]
    k1, k2 = jax.random.split(key)
    img = jnp.pad(x.reshape(n, 8, 8), ((0, 0), (1, 1), (1, 1)))
    off = jax.random.randint(k1, (n, 2), 0, 3)
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), (8, 8)))(img, off)
    return crop.reshape(n, 64) + noise * jax.random.normal(k2, (n, 64))


def _adam(lr):
    import optax
    return optax.adamw(lr, weight_decay=0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "batch", "lr", "augment", "train_backbone",
                                             "train_head", "linear"))
def _train_chunk(params, opt_state, key, x, y, mask, *, cfg, steps, batch, lr, augment, train_backbone,
                 train_head, linear):
    import optax
    opt = _adam(lr)
    fwd = linear_logits if linear else logits

    def loss_fn(p, xb, yb):
        bb = p["backbone"] if train_backbone else jax.lax.stop_gradient(p["backbone"])
        hd = p["head"] if train_head else jax.lax.stop_gradient(p["head"])
        return _xent(fwd(cfg, bb, hd, xb, mask), yb)

    def step(carry, k):
        p, s = carry
        k1, k2 = jax.random.split(k)
        idx = jax.random.randint(k1, (batch,), 0, x.shape[0])
        xb, yb = x[idx], y[idx]
        if augment:
            xb = _augment(k2, xb, 0.1)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, losses


def train_loop(cfg, params, x, y, mask, *, steps, batch, lr, key, augment=False, chunks=1, progress=None,
               tasks_axis=False, train_head=True, linear=False):
    """Adam on cross-entropy for ``steps`` steps (``params = {"backbone", "head"}``).

    With ``tasks_axis`` every argument has a leading task axis and the tasks train in parallel
    (one vmapped program). ``progress`` is called with the number of steps done after each chunk.
    ``train_head=False`` keeps the head frozen (its gradient is zero, so Adam leaves it unchanged);
    ``linear`` uses :func:`linear_logits` instead of the cosine head.
    """
    chunk = max(1, steps // chunks)
    opt = _adam(lr)
    init = jax.vmap(opt.init) if tasks_axis else opt.init
    opt_state = init(params)
    fn = functools_partial(_train_chunk, cfg=cfg, steps=chunk, batch=batch, lr=lr, augment=augment,
                           train_backbone=True, train_head=train_head, linear=linear)
    if tasks_axis:
        fn = jax.vmap(fn)
    done = 0
    losses = []
    while done < steps:
        key, sub = jax.random.split(key)
        subs = jax.random.split(sub, x.shape[0]) if tasks_axis else sub
        params, opt_state, l = fn(params, opt_state, subs, x, y, mask)
        losses.append(np.asarray(l))
        done += chunk
        if progress is not None:
            progress(chunk)
    return params, np.concatenate(losses, axis=-1)


def functools_partial(f, **kw):
    def g(*a):
        return f(*a, **kw)
    return g


@functools.partial(jax.jit, static_argnames=("steps", "lr"))
def _probe_fit(feats, y, mask, w0, *, steps, lr):
    """Full-batch Adam on a linear head over fixed features (vmapped over tasks by the caller)."""
    import optax
    opt = _adam(lr)

    def loss(h):
        return _xent(feats @ h["w"] + h["b"] + mask, y)

    def step(carry, _):
        h, s = carry
        g = jax.grad(loss)(h)
        u, s = opt.update(g, s, h)
        return (optax.apply_updates(h, u), s), None

    (h, _), _ = jax.lax.scan(step, (w0, opt.init(w0)), None, length=steps)
    return h


def train_probes(cfg, backbone, xs, ys, masks, *, steps=300, lr=1e-2):
    """Linear probes on the frozen ``backbone``: one head per task (leading task axis)."""
    feats = jax.vmap(lambda x: features(cfg, backbone, x))(xs)
    h0 = {"w": jnp.zeros((xs.shape[0], cfg.width, MAX_CLASSES)), "b": jnp.zeros((xs.shape[0], MAX_CLASSES))}
    return jax.vmap(lambda f, y, m, w: _probe_fit(f, y, m, w, steps=steps, lr=lr))(feats, ys, masks, h0)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "batch", "lr"))
def _mtl_chunk(params, opt_state, key, xs, ys, masks, *, cfg, steps, batch, lr):
    import optax
    opt = _adam(lr)
    T = xs.shape[0]

    def loss_fn(p, xb, yb):
        def one(h, x, y, m):
            return _xent(logits(cfg, p["backbone"], jax.lax.stop_gradient(h), x, m), y)
        return jnp.mean(jax.vmap(one)(p["heads"], xb, yb, masks))

    def step(carry, k):
        p, s = carry
        idx = jax.random.randint(k, (T, batch), 0, xs.shape[1])
        xb = jnp.take_along_axis(xs, idx[:, :, None], axis=1)
        yb = jnp.take_along_axis(ys, idx, axis=1)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), jax.random.split(key, steps))
    return params, opt_state, losses


def train_multitask(cfg, params, xs, ys, masks, *, steps, batch, lr, key, chunks=1, progress=None):
    """Joint training of one backbone for all tasks (``params = {"backbone", "heads"}``; heads frozen)."""
    chunk = max(1, steps // chunks)
    opt_state = _adam(lr).init(params)
    done, losses = 0, []
    while done < steps:
        key, sub = jax.random.split(key)
        params, opt_state, l = _mtl_chunk(params, opt_state, sub, xs, ys, masks, cfg=cfg, steps=chunk,
                                          batch=batch, lr=lr)
        losses.append(np.asarray(l))
        done += chunk
        if progress is not None:
            progress(chunk)
    return params, np.concatenate(losses)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _acc(backbone, head, x, y, mask, *, cfg):
    return jnp.mean(jnp.argmax(logits(cfg, backbone, head, x, mask), axis=-1) == y)


def accuracy(cfg, backbone, heads, xs, ys, masks, *, backbone_per_task=False) -> np.ndarray:
    """Per-task test accuracy ``(T,)``; one shared backbone unless ``backbone_per_task``."""
    f = jax.vmap(lambda b, h, x, y, m: _acc(b, h, x, y, m, cfg=cfg),
                 in_axes=(0 if backbone_per_task else None, 0, 0, 0, 0))
    return np.asarray(f(backbone, heads, xs, ys, masks))
