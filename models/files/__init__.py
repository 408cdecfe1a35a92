"""Files twinfold reads and writes: atomic writes with checksummed manifests, JSON lines."""
