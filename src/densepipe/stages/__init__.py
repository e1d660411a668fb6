"""One module per DVC stage; each exposes `add_arguments(parser)` and `run(args)`."""
