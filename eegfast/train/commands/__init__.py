"""One module per ``eegfast`` command: ``configure_parser(parser)`` and ``main(args) -> int``."""
