"""One module per ``lorakit`` subcommand; each has ``register(subparsers)``."""
