"""Conditioning strategies: one module each, chosen by name.

``adapter`` (CLIP-Guided SAM), ``ssp`` (semantic-spatial prompts, SSP-SAM) and ``pseudo``
(pseudo prompts from a correlation map, ESC-Net).
"""

from __future__ import annotations

from .adapter import AdapterConditioning
from .base import Conditioning, Context
from .pseudo_prompts import GridSeeds, PseudoConditioning, grid_seeds, pseudo_prompts
from .ssp import SSPConditioning

STRATEGIES: dict[str, type[Conditioning]] = {
    c.name: c for c in (AdapterConditioning, SSPConditioning, PseudoConditioning)
}


def build_conditioning(name: str, **kwargs) -> Conditioning:
    """Build the strategy ``name`` (``adapter``, ``ssp`` or ``pseudo``) with its options."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown conditioning strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name](**kwargs)


__all__ = ["Conditioning", "Context", "STRATEGIES", "build_conditioning", "pseudo_prompts", "grid_seeds", "GridSeeds",
           "AdapterConditioning", "SSPConditioning", "PseudoConditioning"]
