"""The ``popproxy`` command line: one module per subcommand, consoles built only here."""
