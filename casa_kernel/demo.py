"""Things for demos and notebooks: ``from casa_kernel.demo import simulate_ms``."""

from __future__ import annotations

from casa_kernel.casa.simulate import simulate_ms

__all__ = ["simulate_ms"]
