"""Graphs: capture, canonicalisation, relevance-graph construction and export."""
from fxrel.graphs.builder import RelevanceGraph, Stream, build_relevance_graph
from fxrel.graphs.canonical import canonicalize, fold_affine
from fxrel.graphs.capture import capture
from fxrel.graphs.ops import KINDS

__all__ = ["capture", "canonicalize", "fold_affine", "build_relevance_graph", "RelevanceGraph", "Stream", "KINDS"]
