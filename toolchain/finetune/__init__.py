"""Fine-tuning the teacher on the user's task, before a student is made from it."""
