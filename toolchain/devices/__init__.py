"""Where work runs: device placement and data-parallel process plumbing, shared by the
distillation stage, the pipeline and the CLI."""
