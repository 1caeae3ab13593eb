"""Model building and loading: llama-shaped ONNX graphs, GGUF conversion, model folders."""
