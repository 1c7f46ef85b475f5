"""Growth operators: one registry, one spec grammar, written once on the unsharded checkpoint view."""
