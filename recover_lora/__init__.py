"""recover-lora: mixed-precision GGUF export, Recover-LoRA distillation and on-device runtime.

The stage packages live in the repository's top-level folders and install under this
namespace: ``recover_lora.export``, ``recover_lora.recovery``, ``recover_lora.runtime``,
``recover_lora.devices``.
"""

__version__ = "0.1.0"
