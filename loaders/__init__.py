"""Runtime placeholder."""
