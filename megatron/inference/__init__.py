"""After training: load any checkpoint for inference, evaluate it per language, generate text."""
