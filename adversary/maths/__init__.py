"""The attack maths the optimisation attacks share: the client's local training unrolled
(``unroll``), update matching and the descent on inputs (``matching``), label recovery from
the last layer (``labels``) and the matching losses and image priors (``objectives``)."""
