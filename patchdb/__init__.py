"""patchdb: a store and resumable stages for activation-patching layer sweeps."""

__version__ = "0.1.0"
