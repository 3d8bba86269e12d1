"""popproxy: a byte-exact man-in-the-middle proxy that shows, records and replays POP3."""

__version__ = "0.1.0"
