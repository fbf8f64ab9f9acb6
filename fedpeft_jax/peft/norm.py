"""Normalisation scales: every RMSNorm / LayerNorm `scale` trains (+ head on the ViT).

BitFit's counterpart on a bias-free Llama-family decoder: its two RMSNorms a block and the
final one, 2 x layers x hidden + hidden numbers (Llama-2-7B: 266,240). On the ViT, its
LayerNorm scales (BitFit already trains their biases). Not in the FedPEFT paper; its
default learning rate is BitFit's.
"""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod

PEFT_METHODS.register('norm', PeftMethod(
    summary="every normalisation scale (the decoder's RMSNorm weights: BitFit's "
            'counterpart without biases) + head',
    learning_rate=1e-2, trains=lambda path: path[-1] == 'scale', order=6))
