"""Load benchmark and fairness simulator (see README)."""
