"""Model facts from headers alone: GGUF files and Hugging Face directories."""
