"""qsdag package."""
