"""lowbit.functional — filled in by the quantization issues (see DESIGN.md)."""
