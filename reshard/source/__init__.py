"""Where the weights come from: a checkpoint folder or Hub repo, a transformers distributed checkpoint, an artifact."""
