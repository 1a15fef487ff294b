"""Petal node: serves a span of transformer blocks over libp2p."""

__version__ = "0.1.0"
