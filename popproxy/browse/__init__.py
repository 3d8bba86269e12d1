"""``popproxy browse``: the interactive inspector (Textual) for live and recorded sessions."""
