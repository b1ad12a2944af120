"""The composition root: the app factory, the server process and its supervisor, the
background work of a process, logging set-up and the demo set.

Only the CLI imports it; nothing it composes imports it back (tests/test_layout.py).
"""
