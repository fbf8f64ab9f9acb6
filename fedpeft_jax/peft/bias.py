"""BitFit (Ben Zaken et al. 2022): every bias trains, LayerNorm biases included, + head.

Llama-family decoders have no biases (Qwen2's q/k/v projections do: they train): `bias`
on a decoder without any is refused at launch; `norm` is its counterpart there."""
from fedpeft_jax.peft import PEFT_METHODS
from fedpeft_jax.peft.base import PeftMethod, is_decoder


def _check(options, size):
  if is_decoder(size) and not (size.qkv_bias or size.o_proj_bias or size.mlp_bias):
    return 'method', (f'bias trains biases, and this {size.model_type} decoder has none '
                      "(no attention_bias, mlp_bias or Qwen2 q/k/v biases): use 'norm' "
                      "(its RMSNorm scales, BitFit's counterpart), 'lora' or another method")
  return None


PEFT_METHODS.register('bias', PeftMethod(
    summary='every bias (LayerNorm too, BitFit) + head', learning_rate=1e-2,
    trains=lambda path: path[-1] == 'bias', check=_check, order=2))
