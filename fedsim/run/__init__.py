"""The wiring: everything that puts the layers below together for one run.

The command line (``cli``), run preparation (``preparation``: validation with every registry,
data, run directory, device, attack sink), the Flower simulation (``simulation``), single-shot
mode (``single_shot``), the Flower App entry for ``flwr run .`` (``flower_app``), the one place
Ray is started (``ray_cluster``) and the terminal tables (``tables``). This subpackage may
import every layer; nothing outside it imports it (``tests/test_layers.py`` checks).
"""
