"""`make bench` (``python -m bench.load``): kiropool under load against a
minimal DRF floor, on PostgreSQL. See ``__main__`` for the phases."""
