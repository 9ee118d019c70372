"""The command line's commands, one module per topic, each registering its subcommands with
`register(sub)` on `python -m core`'s parser (core/__main__.py, which holds the error edge).

A front end like the pages and the API: each command parses its flags, calls the library and prints.
The top of the flow beside core/jobs: may import every package; nothing in core/ imports it.
"""
