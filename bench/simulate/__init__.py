"""Fairness simulator: kiropool's ordering contract against five alternatives,
on identical simulated (or replayed) traffic, in simulated time.

``python -m bench.simulate`` (``make simulate``) runs it; see the README's
"Fairness simulator" section for what it measures and the figures it gives.
The modules: ``scenario`` (the pool and the knobs), ``traffic`` (synthetic
traffic and trace replay), ``policies`` (the six orderings), ``engine`` (the
dispatcher in simulated time), ``metrics``, ``report`` and ``plots``.
"""
