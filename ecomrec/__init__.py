"""The ``ecomrec`` command line: dispatches to each package's ``cli.register``."""
