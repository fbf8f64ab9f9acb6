"""FedIT (Zhang et al. 2024, "Towards Building the Federated GPT: Federated Instruction
Tuning"): FedAvg on the LoRA factors, A and B averaged apart. The served update Ā·B̄ is
not the average of the clients' products Σp_i A_i B_i (their cross terms), so its
aggregation error is positive once the clients' A_i differ. The default rule; with clients
of different ranks each one's update is zero past its rank (zero-padded, as HetLoRA's
distribution, without its weighting).
"""
from fedpeft_jax.federated.lora_rules import LORA_RULES
from fedpeft_jax.federated.lora_rules.base import LoraRuleSpec, Rule


def server(lay, sums, mean_delta, end):
  """The aggregator's mean update as it is: Ā = A + mean ΔA, B̄ = B + mean ΔB."""
  return mean_delta, sums.state, None


RULE = Rule(server=server)

LORA_RULES.register('fedit', LoraRuleSpec(
    RULE, any_algorithm=True, summary='A and B averaged apart (FedAvg on the factors): the default, inexact'))
