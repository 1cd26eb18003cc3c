"""export/: a Hugging Face model or a GGUF becomes a mixed-precision GGUF quantized by llama.cpp."""
