"""Generative image priors of the attacker (GIAS/GIML): the DCGAN models, their checkpoints,
their training on auxiliary data and their meta-learning from observed updates."""
