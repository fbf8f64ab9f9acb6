"""FedIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction
Tuning"): FedAvg on the LoRA factors, A and B averaged apart. The served update Ā·B̄ is
not the average of the clients' products Σp_i A_i B_i (their cross terms), so its
aggregation error is positive once the clients' A_i differ. The default rule. With clients
of different ranks each one trains the first r columns of A and rows of B, its update is
zero past them, and the server averages the updates (the aggregator's mean), so a column
moves by its trainers' updates over all aggregated clients' weight.
"""
from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules.base import LoraRuleSpec, Rule


def server(lay, sums, mean_delta, end):
  """The aggregator's mean update as it is: Ā = A + mean ΔA, B̄ = B + mean ΔB."""
  return mean_delta, sums.state, None


RULE = Rule(server=server)

LORA_RULES.register('fedit', LoraRuleSpec(
    RULE, any_algorithm=True, summary='A and B averaged apart (FedAvg on the factors): the default, inexact'))
