"""Graph passes: folding and the HASTE rewrite."""
