"""Federated LoRA aggregation rules by name (`LORA_RULES`; `--config.peft.lora_aggregation`).

How the server combines the clients' LoRA factors: averaging A and B apart (FedIT, the
default) is not the average of the clients' products B_i·A_i, and the published rules
differ in how they close that gap (FFA-LoRA, FedEx-LoRA, FLoRA, FlexLoRA, HetLoRA,
FedSA-LoRA, Fed-SB). Each file here registers one `LoraRuleSpec`; each makes a federated
`Algorithm` (hooks on the one compiled round) from the run's LoRA `Layout` (which maps
are adapted, at what ranks each client trains). `base.py` holds what they share: the
clients' products summed streamingly, rank masks for clients of different ranks
(`client_ranks`), and the aggregation error every rule reports each round.
"""
from fedpeft_jax import registry
from fedpeft_jax.federated.lora_rules.base import (BASE_ALGORITHMS, ERROR_KEY, Layout,
                                                  LoraRuleSpec, algorithm, check_layout,
                                                  client_bytes, layout)
from fedpeft_jax.federated.lora_rules.ranks import RANK_DISTRIBUTIONS, client_ranks

LORA_RULES: registry.Registry[LoraRuleSpec] = registry.Registry('LoRA aggregation rule',
                                                               argument='rule')

registry.import_all(__name__, __path__)

__all__ = ['BASE_ALGORITHMS', 'ERROR_KEY', 'LORA_RULES', 'Layout', 'LoraRuleSpec',
           'RANK_DISTRIBUTIONS', 'algorithm', 'check_layout', 'client_bytes', 'client_ranks',
           'layout']
