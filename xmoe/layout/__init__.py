"""Routing layouts (who sends what where) and the symmetric buffer layout."""
