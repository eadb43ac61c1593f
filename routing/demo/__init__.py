"""The demo (``make demo``): a demonstration pool, a staff login for it, and
synthetic gateways playing against the real HTTP API.

Conversations stick to their account, stateless calls spread, first-token
latencies differ per account, and a rate limit, a proxy failure and an
exhausted quota happen on cue, so the dashboards show all of it. The
``demo`` management command is a thin shell around the two modules here:

- ``pool``: what the demo writes to the database it is pointed at (the pool,
  its keys and the staff login) and the check for rows it did not make;
- ``traffic``: the HTTP API as a gateway and an operator see it, and the
  gateway clients that play against it.
"""
