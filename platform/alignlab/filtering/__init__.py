"""CAT data filtering (docs/methods.md "CAT filtering"): caption complexity and actions, text spotting, CLIP-score
baseline."""
