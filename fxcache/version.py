"""The package version (one place: the package, export manifests and the CLI read it)."""

__version__ = "0.1.0"
