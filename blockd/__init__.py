"""blockd: enforce exactly what a signed order says, refuse collateral, and prove it."""

__version__ = "0.1.0"
