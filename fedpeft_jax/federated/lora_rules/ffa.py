"""FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
A stays at its initialisation (from the run's seed, so every client has it; `peft.lora`
freezes it), only B trains and travels, and the average of the clients' A·B_i is exactly
A·B̄: FedIT's server step on a model whose A does not train. `peft.lora_freeze_a=True` is
its older name. Exact, and its server step is a noised sum under client DP.
"""
from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import fedit
from fedpeft_jax.federated.lora_rules.base import LoraRuleSpec

LORA_RULES.register('ffa', LoraRuleSpec(
    fedit.RULE, exact=True, any_algorithm=True,
    summary='A frozen at its seeded initialisation, B trained and averaged: exact'))
