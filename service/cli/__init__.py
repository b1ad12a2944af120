"""The ``mhr`` command: ``main`` and the top-level commands in ``main.py``, the key and
audit-key rotation commands in ``key_rotation.py``. Packages with a command group of
their own register it from their package (``service.tasks.cli``, ``service.figures.cli``).
"""
