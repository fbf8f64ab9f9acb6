"""Fed-SB (Singhal et al. 2025, "Fed-SB: A Silver Bullet for Extreme Communication
Efficiency and Performance in (Private) Federated LoRA Fine-Tuning"): A and B fixed, an
r x r matrix R between them trained (`peft.lora` builds x @ A @ R @ B for this rule, R
zero-initialised), and R averaged: Σp_i A R_i B = A R̄ B, exact, and only r² numbers per
map travel each way. The paper initialises A and B from the first gradient's SVD
(LoRA-SB); here A is He-uniform and B has orthonormal rows, both from the run's seed, so
A R B has R's rank. Its server step is a noised sum under client DP (the paper's point).
"""
from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules import fedit
from fedpeft_jax.federated.lora_rules.base import LoraRuleSpec

LORA_RULES.register('fedsb', LoraRuleSpec(
    fedit.RULE, exact=True, any_algorithm=True,
    summary='A and B fixed, the r x r matrix R between them trained and averaged: exact, '
            'r² numbers per map'))
