"""HTTP layer: routes, dependencies and request parsing. No SQL, no rules about who may see what."""
