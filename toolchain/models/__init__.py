"""Loading and saving models, the bundled default teachers, and per-architecture facts."""
