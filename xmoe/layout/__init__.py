"""Pure index math of the symmetric buffer: where every token of every peer lands (no kernel code)."""
