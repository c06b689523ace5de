"""Group-sparsity optimizers working on zero-invariant groups."""
