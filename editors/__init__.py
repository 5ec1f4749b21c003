"""Editors room: the `Editor` protocol and registry, the shared locate-then-edit core, SADR, one file per editor."""
