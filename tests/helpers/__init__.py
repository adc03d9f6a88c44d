"""Shared test helpers, imported the ordinary way (``from helpers.data import write_png``): writers of
tiny datasets in the real on-disk formats, tiny models, and the engine's small training runs."""
