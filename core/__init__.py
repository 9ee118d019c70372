"""Lymphoma subtype recognition: the library behind the app and the CLI (`python -m core`)."""
