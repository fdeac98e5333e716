"""Shared data layer: training text and its train/held-out split (corpus), the order batches
visit it (batch_order), and the files a user names (task_files: pairs, prompts, checked
without torch)."""
