"""fxrel's version, in the lowest layer so that every module can record it (run files, table headers)."""
__version__ = "0.1.0"
