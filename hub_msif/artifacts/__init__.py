"""Artifact folders on disk: atomic writes, the manifests, sha256 verification (no torch)."""
