"""Tests of the debugger (teams B1, B2)."""
