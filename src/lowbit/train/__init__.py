"""lowbit.train (see DESIGN.md)."""
