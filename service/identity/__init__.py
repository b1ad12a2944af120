"""Organizations, machine clients and SMART Backend Services token issuance."""
