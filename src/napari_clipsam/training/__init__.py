"""Few-label fine-tuning: examples, prompt simulation, losses, LoRA setup, the loop and adapter files.

Public API::

    examples = examples_from_arrays(image, {"nucleus": labels})       # or _files / _layers
    result = finetune(model, examples, FineTuneConfig(mode="both"), callback=None, cancel=None)
    save_adapter("cells.safetensors", model); load_adapter("cells.safetensors", other_model)
"""

from .adapter_file import (AdapterMismatchError, adapter_fingerprint, base_fingerprint, load_adapter, read_adapter,
                           remove_adapter, save_adapter)
from .examples import TrainingExample, examples_from_arrays, examples_from_files, examples_from_layers, validate_examples
from .finetune import FineTuneConfig, FineTuneResult, Progress, evaluate, finetune
from .lora import LoraSettings, attach_lora, detach_lora, merge_lora, trainable_report
from .losses import LossWeights, mask_loss
from .prompts import PromptSettings, downsample_target

__all__ = ["AdapterMismatchError", "FineTuneConfig", "FineTuneResult", "LoraSettings", "LossWeights", "Progress",
           "PromptSettings", "TrainingExample", "adapter_fingerprint", "attach_lora", "base_fingerprint",
           "detach_lora", "downsample_target", "evaluate", "examples_from_arrays", "examples_from_files",
           "examples_from_layers", "finetune", "load_adapter", "mask_loss", "merge_lora", "read_adapter",
           "remove_adapter", "save_adapter", "trainable_report", "validate_examples"]
