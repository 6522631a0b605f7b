"""The emascope version (torch-free; also written into run.json and export metadata)."""

__version__ = "0.1.0"
