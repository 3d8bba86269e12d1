"""Entry point for ``python -m popproxy``."""

from popproxy.cli.main import main

if __name__ == "__main__":  # the live view's renderer process imports this module again
    raise SystemExit(main())
