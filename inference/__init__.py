"""Using a trained model: the model loader (architecture from a checkpoint), per-step recording and serving."""
