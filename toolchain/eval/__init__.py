"""Task evaluation: generate on the eval split with each model in the runtime that ships it, grade, compare."""
