"""lowbit.methods (see DESIGN.md)."""
