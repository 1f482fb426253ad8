"""Ray workers: pipeline stages on groups of devices of a Ray cluster (see `workers.backend`)."""
