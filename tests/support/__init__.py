"""Helpers shared by the test suite: a private Dovecot server and real POP3 clients."""
