"""Shared data layer: the files a user names (task pairs, prompts), read and checked without torch."""
