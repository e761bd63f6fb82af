"""Commands over a finished sweep (predict, export) and over a cluster (submit)."""
