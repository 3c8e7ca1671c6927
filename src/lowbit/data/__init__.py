"""lowbit.data (see DESIGN.md)."""
