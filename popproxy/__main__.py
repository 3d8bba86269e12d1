"""Entry point for ``python -m popproxy``."""

from popproxy.cli.main import main

raise SystemExit(main())
