"""Attack implementations, one module (or package) each; ``base`` is the interface they share.
The registry (``adversary.runtime.registry``) lists them."""
