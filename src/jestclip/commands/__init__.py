"""The command-line app: one module per ``jestclip`` subcommand, each with ``add_parser`` and ``run``."""
