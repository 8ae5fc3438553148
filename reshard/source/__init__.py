"""Where the weights come from: a checkpoint folder or Hub repo, or another artifact; pre-flight checks."""
