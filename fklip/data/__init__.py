"""The original's data formats (spec section 1) and the demo dataset generator."""
