"""Llama-2-7B with FlowerTune's federated protocol (Flower's LLM leaderboard, general NLP).

  python launch.py --config=experiments/llama2_7b.py:lora --mode=masks --workdir=/tmp/masks

counts every method's trainable parameters with no weights downloaded: the model is
described by the values of Llama-2-7B's published `config.json` (meta-llama/Llama-2-7b-hf),
written in below as `model.hf_config`. With `--config.peft.lora_rank=8` LoRA on q_proj and
v_proj trains 4,194,304 of 6,742,609,920 parameters, the count Hugging Face PEFT prints for
that model (tests/test_causal_lm.py).

To train, on a machine with the weights (or a Hub login with access to the gated repo):

  python launch.py --config=experiments/llama2_7b.py:lora --workdir=runs/llama2_lora \\
    --config.model.checkpoint=meta-llama/Llama-2-7b-hf

(`model.hf_config` must then agree with the checkpoint's `config.json`, which launch checks.)

FlowerTune's defaults: 20 clients, 10% of them (2) a round, IID shares of
vicgalle/alpaca-gpt4 (instruction -> output, loss on the response), LoRA rank 32, alpha 64
on q_proj and v_proj, 200 rounds, batch 16, sequences of 512 tokens. FlowerTune trains each
client for 10 AdamW steps a round on a 4-bit model; here a client runs 1 local epoch of
SGD with the method's default learning rate, on bfloat16 frozen weights.
"""
from fedpeft_jax import configs

# meta-llama/Llama-2-7b-hf config.json (rope_theta: transformers' default, not in the file).
LLAMA2_7B = {
    'model_type': 'llama', 'hidden_act': 'silu', 'hidden_size': 4096,
    'intermediate_size': 11008, 'num_hidden_layers': 32, 'num_attention_heads': 32,
    'num_key_value_heads': 32, 'vocab_size': 32000, 'tie_word_embeddings': False,
    'rms_norm_eps': 1e-5, 'rope_theta': 10000.0, 'max_position_embeddings': 4096,
    'bos_token_id': 1, 'eos_token_id': 2,
}


def get_config(arg: str = 'lora'):
  """`arg`: METHOD[,dp=none|client|sample][,clients=N][,participation=F]; FlowerTune's 20
  clients and 10% participation by default."""
  c = configs.base_config(arg, clients='20', participation='0.1')
  c.model.family = 'llama'
  c.model.hf_config = dict(LLAMA2_7B)
  c.model.dtype = 'bfloat16'
  c.model.frozen_dtype = 'bfloat16'
  c.peft.lora_rank = 32
  c.peft.lora_alpha = 64.0
  c.peft.lora_targets = 'q_proj,v_proj'
  c.data.source = 'text'
  c.data.name = 'vicgalle/alpaca-gpt4'
  c.data.prompt_field = 'instruction'
  c.data.response_field = 'output'
  c.data.max_length = 512
  # The Hub set has one split: 2% of it held out (datasets' slicing) for test perplexity.
  c.data.train_split = 'train[:98%]'
  c.data.test_split = 'train[98%:]'
  c.data.partition = 'iid'
  c.fl.rounds = 200
  c.fl.local_epochs = 1
  c.fl.batch_size = 16
  c.fl.eval_every = 10
  c.eval.batch_size = 16
  return c
