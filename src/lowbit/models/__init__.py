"""lowbit.models (see DESIGN.md)."""
