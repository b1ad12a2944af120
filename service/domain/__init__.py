"""The service's own vocabulary shared by every use-case: what a use-case refuses (errors)."""
