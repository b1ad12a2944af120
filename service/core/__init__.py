"""What every layer of a process may use: the settings, the shutdown state, the metrics
registry, the request id and this instance's name, the thread limiter for CPU-bound work.

It imports nothing else from service/ (tests/test_layout.py), so anything may import it.
"""
