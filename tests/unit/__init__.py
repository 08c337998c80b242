"""Unit tests: no root, no kernel changes, seconds in all."""
