import os

# Tile-reading worker processes share the cores with torch's compute threads; OpenMP threads that
# spin while waiting steal those cycles. Passive waiting keeps the readers fed (see bench/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402  (after the environment is set, before torch is imported)

main()
