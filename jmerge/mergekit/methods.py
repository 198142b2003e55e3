"""mergekit's merge methods and how each maps to a jmerge method.

Each :class:`MergekitMethod` names the jmerge method, whether a base model is required, how mergekit's
per-tensor parameters are renamed (``lambda`` is jmerge's ``scale``), mergekit's fixed options with
their defaults, how those options translate to jmerge factory arguments, and mergekit's defaults of
the traced hyperparameters (which override jmerge's). ``passthrough`` (:data:`PASSTHROUGH`) is not a
per-tensor merge: it stacks layer slices, and the config's inputs stage resolves it.

References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
(EMNLP 2024 industry track).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

__all__ = ["MergekitMethod", "MERGEKIT_METHODS", "PASSTHROUGH"]

PASSTHROUGH = "passthrough"
"""mergekit's slice-only method: layers copied from ``slices`` (or one model), optionally scaled."""

Translate = Callable[[dict, bool], dict]


@dataclasses.dataclass(frozen=True)
class MergekitMethod:
    """How one mergekit method maps to jmerge.

    Attributes:
      jm: the jmerge method name (a key of :func:`jmerge.available_methods`).
      base: ``"required"``, ``"optional"`` or ``"none"`` (the models are merged directly).
      rename: mergekit per-tensor parameter -> jmerge (traced) hyperparameter.
      options: mergekit fixed options with their mergekit defaults.
      translate: ``translate(options, has_base)`` -> factory keyword arguments (None: no arguments);
        raises ValueError for option values jmerge does not support.
      hp_defaults: mergekit defaults of the traced hyperparameters (override jmerge's).
      ignored: mergekit parameters accepted and ignored.
      max_models: at most this many models besides the base (None: no limit).
      required: parameters a config must set (mergekit name -> what it means).

    References: Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large Language Models"
    (EMNLP 2024 industry track).
    """

    jm: str
    base: str
    rename: Mapping[str, str] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    translate: Optional[Translate] = None
    hp_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ignored: frozenset = frozenset({"int8_mask"})
    max_models: Optional[int] = None
    required: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _consensus_kw(o: dict) -> dict:
    return {"reduce": "mean", "normalize_by": "weight"} if o["normalize"] else {"reduce": "sum"}


def _rescale_kw(o: dict) -> dict:
    return {"rescale": "l1" if o["rescale"] else "none"}


def _no_rescale(name: str) -> Callable[[dict], dict]:
    def check(o: dict) -> dict:
        if o["rescale"]:
            raise ValueError(f"'rescale: true' with {name} (magnitude trimming) is not supported by jmerge; "
                             "drop it or use dare_*/della")
        return {}
    return check


_GTA = {"weight": "weight", "density": "density", "lambda": "scale"}
_GTA_HP = {"weight": 1.0, "density": 1.0, "scale": 1.0}


def _gta(jm: str, normalize: bool, rescale: bool, translate: Translate, extra_rename: Optional[dict] = None,
         extra_hp: Optional[dict] = None, ignored: tuple = ("int8_mask",)) -> MergekitMethod:
    """A generalized task arithmetic method (mergekit's ``GeneralizedTaskArithmeticMerge``)."""
    return MergekitMethod(jm, "required", {**_GTA, **(extra_rename or {})},
                          {"normalize": normalize, "rescale": rescale}, translate,
                          {**_GTA_HP, **(extra_hp or {})}, frozenset(ignored))


MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("linear", "none", {"weight": "weight"}, {"normalize": True},
                             lambda o, b: {"normalize": bool(o["normalize"])}, {"weight": 1.0}),
    "task_arithmetic": _gta("task_arithmetic", False, False,
                            lambda o, b: {"normalize": bool(o["normalize"]), **_no_rescale("task_arithmetic")(o)},
                            ignored=("int8_mask", "density")),
    "ties": _gta("ties", True, False, lambda o, b: {"scope": "tensor", "weighted": True, "rounding": "floor",
                                                     "sign_method": "sum", **_consensus_kw(o),
                                                     **_no_rescale("ties")(o)}),
    "dare_ties": _gta("dare_ties", False, True, lambda o, b: {**_consensus_kw(o), **_rescale_kw(o)}),
    "dare_linear": _gta("dare_linear", False, True, lambda o, b: {"normalize": bool(o["normalize"]),
                                                                  **_rescale_kw(o)}),
    "breadcrumbs": _gta("breadcrumbs", False, False,
                        lambda o, b: {"normalize": bool(o["normalize"]), "rounding": "floor",
                                      **_no_rescale("breadcrumbs")(o)},
                        {"gamma": "gamma"}, {"gamma": 0.01}),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", False, False,
                             lambda o, b: {"rounding": "floor", **_consensus_kw(o), **_no_rescale("breadcrumbs")(o)},
                             {"gamma": "gamma"}, {"gamma": 0.01}),
    "della": _gta("della", True, True, lambda o, b: {**_consensus_kw(o), **_rescale_kw(o)},
                  {"epsilon": "epsilon"}, {"epsilon": 0.15}),
    "della_linear": _gta("della_linear", False, True, lambda o, b: {"normalize": bool(o["normalize"]),
                                                                    **_rescale_kw(o)},
                         {"epsilon": "epsilon"}, {"epsilon": 0.15}),
    "slerp": MergekitMethod("slerp", "required", {"t": "t"}, max_models=1,
                            required={"t": "interpolation factor: 0 = base, 1 = the other model"}),
    "nearswap": MergekitMethod("nearswap", "required", {"t": "t"}, max_models=1),
    "nuslerp": MergekitMethod("nuslerp", "optional", {"weight": "weight"},
                              {"nuslerp_flatten": True, "nuslerp_row_wise": False},
                              lambda o, b: {"flatten": bool(o["nuslerp_flatten"]),
                                            "row_wise": bool(o["nuslerp_row_wise"]), "base_relative": b},
                              {"weight": 1.0}, max_models=2),
    "multislerp": MergekitMethod("multislerp", "optional", {"weight": "weight", "eps": "eps"},
                                 {"normalize_weights": True},
                                 lambda o, b: {"normalize_weights": bool(o["normalize_weights"]), "base_relative": b},
                                 {"weight": 1.0, "eps": 1e-8}),
    "karcher": MergekitMethod("karcher", "none", {"tol": "tol"}, {"max_iter": 10},
                              lambda o, b: {"max_iter": int(o["max_iter"])}, {"tol": 1e-5}),
    "model_stock": MergekitMethod("model_stock", "required", {}, {"filter_wise": False},
                                  lambda o, b: {"filter_wise": bool(o["filter_wise"])}),
    "sce": MergekitMethod("sce", "required", {"select_topk": "density"}, {}, lambda o, b: {"rounding": "floor"},
                          {"density": 1.0}),
    # arcee_fusion takes no parameters; model cards often carry GTA options, which mergekit ignores too
    "arcee_fusion": MergekitMethod("arcee_fusion", "required", ignored=frozenset({"int8_mask", "normalize", "rescale"}),
                                   max_models=1),
    "ram": MergekitMethod("ram", "required", {"epsilon": "epsilon"}, hp_defaults={"epsilon": 1e-5}),
    "ramplus_tl": MergekitMethod("ramplus_tl", "required", {"r": "r", "alpha": "alpha", "epsilon": "epsilon"},
                                 hp_defaults={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
}
"""mergekit method name -> how it maps to a jmerge method (:data:`PASSTHROUGH` is slice-only, not here)."""


@dataclasses.dataclass(frozen=True)
class _Method:
    """A config's method, resolved against a method registry."""

    name: str  # as written in the config (mergekit or jmerge name)
    jm: str  # the jmerge method name (PASSTHROUGH for passthrough)
    spec: Optional[MergekitMethod]  # None: a jmerge-native method, or passthrough
    factory: Optional[Callable[..., Any]]  # None: passthrough

    @property
    def base_policy(self) -> str:
        return self.spec.base if self.spec is not None else "required"


def _known_methods(methods: Mapping[str, Any]) -> list[str]:
    """Every name a config may use with this registry: jmerge's, mergekit's mapped ones, passthrough."""
    mapped = {k for k, v in MERGEKIT_METHODS.items() if v.jm in methods}
    return sorted(set(methods) | mapped | {PASSTHROUGH})
