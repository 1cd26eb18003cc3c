"""runtime/: llama-cpp-python runs base + adapter, measures tokens/s and evaluates benchmarks."""
