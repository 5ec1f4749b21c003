"""driftbench: reproducible benchmark and leaderboard for knowledge editing — the command line (`driftbench.cli`).

Nothing below imports this package: the shared plumbing (io, params, errors, cell ids) lives in `basis`."""

from basis import __version__  # noqa: F401  (one home for the version: basis)
