"""Attack implementations; importing this package registers every attack."""
from adversary.attacks import dlg, geiping, spear  # noqa: F401
