"""ds-widenet: WideNet, ViT and ViT-MoE trained with DeepSpeed (MoE, expert parallelism, ZeRO)."""
from .distributed import select_accelerator

# Before anything imports deepspeed: without a GPU, use DeepSpeed's CPU accelerator and gloo.
select_accelerator()

__version__ = "0.1.0"
