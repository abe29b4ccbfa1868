"""dyf: DYffusion probabilistic forecasting of gridded spatiotemporal data."""

__version__ = "0.1.0"
