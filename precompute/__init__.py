"""Lumen precompute: slides -> tiles -> activations -> clusters -> atlas."""

__version__ = "0.1.0"
