from e2e_helpers import live_server

__all__ = ["live_server"]
