"""Data: built-in sets, files, and the user's own factories, all returning the same mapping of arrays."""
