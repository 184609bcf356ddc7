"""Running attacks: the registry of attacks (``registry``), one job from observation to
leakage record (``execution``) and the Ray inversion pool (``workers``)."""
