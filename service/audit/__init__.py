"""The tamper-evident audit trail: one chokepoint writes entries, an integrator seals them."""
