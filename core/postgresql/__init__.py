"""kiropool's PostgreSQL backend (``ENGINE = "core.postgresql"``): Django's,
answering at once while its connection pool cannot reach the database
(:mod:`core.postgresql.outage`)."""
