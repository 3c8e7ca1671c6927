"""lowbit.convert — filled in by the quantization issues (see DESIGN.md)."""
