"""lowbit.report (see DESIGN.md)."""
