"""The methods: one module per paper (rule sets built from :mod:`fxrel.rules`' templates), the :class:`Method`
they build and the registry every method — sweep or wrapper — is listed in. Importing the package registers the
sweeps; the wrappers (:mod:`fxrel.wrappers`, :mod:`fxrel.ucag`, :mod:`fxrel.ssl`) register themselves on import.

(Not ``fxrel.methods``: that name is the listing function ``fxrel.methods()``.)
"""
from fxrel.catalog import agf, cam, contrastive, lrp, rap, rsp, srd  # noqa: F401  (register the sweeps)
from fxrel.catalog.method import CONSERVING, SIGNED, Method, StreamSpec, seed_gradient, seed_logit, times_input
from fxrel.catalog.registry import REGISTRY, MethodInfo, describe, make_method, method_info, register, register_wrapper

__all__ = ["CONSERVING", "SIGNED", "Method", "StreamSpec", "seed_gradient", "seed_logit", "times_input", "REGISTRY",
           "MethodInfo", "describe", "make_method", "method_info", "register", "register_wrapper"]
