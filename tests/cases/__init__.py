"""Per-operator test tables, one module per operator."""
