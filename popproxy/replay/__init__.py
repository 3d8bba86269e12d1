"""Replay and comparison of recorded POP3 sessions."""
