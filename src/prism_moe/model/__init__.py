"""What a model is: its shape (spec), the experts hook, partial loading, tiny checkpoints."""
