"""The lower room every other room imports: errors a user can cause, strict JSON and atomic file io, params.yaml
and its profiles, and the cell-id grammar. It imports no other room of this repository (and never the CLI), and
stays importable without torch."""

__version__ = "0.1.0"
