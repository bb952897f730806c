"""relayer/bus package."""
