"""The privacy ledger of a run: every round's executed mechanism, and the noise it runs at.

One `PrivacyLedger` serves the whole run: the training entry point restores it from
the run checkpoint, `experiment.build.privacy_spec` reads it to set the noise of the
rounds still to run (a resume keeps the noise; a grown run under a target epsilon
calibrates only the rounds left), and `experiment.callbacks.Privacy` records each
round into it and composes the epsilon printed. Its `state_dict` is what the checkpoint
holds under 'privacy', in the layout checkpoints have always had:
  {'ledger': [round records], 'calibrated_for_rounds': int, 'noise_multiplier': float}.
"""
from __future__ import annotations

from typing import Any, Sequence

from fedpeft_jax.privacy import accounting


class PrivacyLedger:
  """What a DP run has executed so far.

  records: one `accounting.round_record` (JSON-serialisable dict) per round run, in order.
  calibrated_for_rounds: `fl.rounds` of the last recorded round's mechanism (its
    `PrivacySpec.rounds`): the length its noise was chosen for. None before any round.
  noise_multiplier: that mechanism's noise multiplier (the configured or calibrated one,
    before adaptive clipping's split). None before any round.
  """

  def __init__(self, records: Sequence[dict] = (), calibrated_for_rounds: int | None = None,
               noise_multiplier: float | None = None):
    self.records = list(records)
    self.calibrated_for_rounds = calibrated_for_rounds
    self.noise_multiplier = noise_multiplier

  def __len__(self) -> int:
    """Rounds recorded."""
    return len(self.records)

  def record(self, spec: accounting.PrivacySpec) -> None:
    """Appends one round of `spec`'s mechanism, as executed, and remembers its noise."""
    self.records.append(accounting.round_record(spec))
    self.calibrated_for_rounds, self.noise_multiplier = spec.rounds, spec.noise_multiplier

  def epsilon(self, delta: float, accountant: str = 'auto') -> float:
    """Epsilon at `delta` of every recorded round composed (`accounting.ledger_epsilon`):
    0 for an empty ledger, math.inf if a round ran without noise. UserError (argument
    'delta') if delta is not below one over a recorded population."""
    return accounting.ledger_epsilon(self.records, delta, accountant)

  def grown(self, spec: accounting.PrivacySpec) -> bool:
    """Whether `spec` runs the recorded rounds' mechanism for another number of rounds than
    its noise was calibrated for (a finished run resumed with a larger `fl.rounds`)."""
    return bool(self.records) and self.calibrated_for_rounds != spec.rounds

  def calibrate(self, spec: accounting.PrivacySpec, target_epsilon: float) -> float:
    """The noise multiplier of the rounds `len(self) + 1 .. spec.rounds`, such that they and
    the recorded ones together deliver `target_epsilon` at `spec.delta`:
    - empty ledger: the whole run's calibration (`accounting.calibrate_noise`);
    - recorded rounds calibrated for `spec.rounds`: their own noise, exactly (a resume
      never recalibrates the rounds it reruns);
    - `grown(spec)`: the remaining rounds' calibration (`accounting.calibrate_remaining`).
    Raises UserError (argument 'target_epsilon') if the target cannot be reached."""
    if not self.records:
      return accounting.calibrate_noise(spec, target_epsilon)
    if not self.grown(spec):
      return self.noise_multiplier
    return accounting.calibrate_remaining(self.records, spec, target_epsilon,
                                          spec.rounds - len(self.records))

  def state_dict(self) -> dict[str, Any]:
    """The checkpoint's 'privacy' values (JSON-serialisable)."""
    return {'ledger': self.records, 'calibrated_for_rounds': self.calibrated_for_rounds,
            'noise_multiplier': self.noise_multiplier}

  def load_state_dict(self, saved: dict[str, Any]) -> None:
    """Restores what `state_dict` returned (as read back from the checkpoint's JSON)."""
    self.records = list(saved['ledger'])
    self.calibrated_for_rounds = saved.get('calibrated_for_rounds')
    self.noise_multiplier = saved.get('noise_multiplier')

  @classmethod
  def from_state_dict(cls, saved: dict[str, Any]) -> PrivacyLedger:
    ledger = cls()
    ledger.load_state_dict(saved)
    return ledger
