"""Running Phi models: weight-only quantization, a batching decode engine, terminal chat, an OpenAI-compatible
server and GGUF export. Submodules import torch; import them only where needed."""
