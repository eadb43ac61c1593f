"""Fairness simulator: kiropool's ordering contract against five alternatives,
and kiropool's dispatcher with and without issue 12's behaviours (outlier
ejection, credit pacing, sticky patience), on identical simulated (or
replayed) traffic, in simulated time.

``python -m bench.simulate`` (``make simulate``) runs it; see the README's
"Fairness simulator" section for what it measures and the figures it gives.
The modules: ``scenario`` (the pools, the knobs, the upkeep day), ``traffic``
(synthetic traffic and trace replay), ``policies`` (the six orderings),
``variants`` (the dispatcher behaviours), ``state`` (the pool's state and the
server's writes on it), ``affinity`` (session bindings), ``engine`` (the
dispatcher in simulated time: the event queue, completions, resets, the
periodic work), ``leases`` (its dispatch call: the fast path, patience, the
walk, waiting), ``events`` (the kinds of event both schedule), ``runs``,
``results``, ``metrics``, ``report`` and ``plots``.
"""
