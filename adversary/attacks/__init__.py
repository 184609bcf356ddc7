"""Attack implementations; importing this package registers every attack."""
from adversary.attacks import dlg  # noqa: F401
from adversary.attacks import geiping  # noqa: F401
