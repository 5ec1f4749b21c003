"""driftbench: reproducible benchmark and leaderboard for knowledge editing (CLI and shared plumbing).

This package holds only the command line and dependency-free helpers (atomic IO, hashing, params).
It must stay importable without torch: `leaderboard` and `data_pipeline` import from it.
"""

__version__ = "0.1.0"
