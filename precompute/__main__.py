import os

# Tile-reading worker processes share the cores with torch's compute threads; OpenMP threads that
# spin while waiting steal those cycles. Passive waiting keeps the readers fed (see bench/README.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")



def run() -> None:
    """`python -m precompute` and the `lumen-precompute` command."""
    from .cli import main  # after the environment is set, before torch is imported

    main()


if __name__ == "__main__":
    run()
