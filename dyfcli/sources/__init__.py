"""One module per raw source or simulator; each turns its input into a data store (docs/design.md §3)."""
