"""Backdoor attacks: one module each, one registry (ATTACKS)."""

from cleanse.attacks import badnets, blended, sig, wanet  # noqa: F401  (registration)
from cleanse.attacks.base import ATTACKS, Attack
from cleanse.attacks.poison import poison_dataset
from cleanse.attacks.trigger import Trigger, load_trigger, parse_target

__all__ = ["ATTACKS", "Attack", "Trigger", "load_trigger", "parse_target", "poison_dataset"]
