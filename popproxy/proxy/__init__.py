"""The recording proxy: listener, session controller, relay control and the tap beside it."""
