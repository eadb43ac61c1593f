"""The framework floor of `make bench` (issue 14): the best a minimal DRF
endpoint does on this machine, as its own tiny Django project so nothing of it
sits in kiropool's URLconf or settings. Served by gunicorn with sync workers,
as issue 14 defines the floor (see ``bench.load.servers``)."""
