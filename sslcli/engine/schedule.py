"""A run's step horizon and its lr / weight-decay schedule, as pure functions of the step.

The horizon is ``epochs * steps_per_epoch`` whatever ``trainer.max_steps`` says:
``max_steps`` only stops the loop early (``stop_step``), so a run stopped there and
resumed with a larger ``max_steps`` follows the schedule one uninterrupted run would.
The curves themselves are :mod:`sslcli.nn.schedules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.optim import Optimizer

from sslcli.config import RunConfig, ScheduleConfig
from sslcli.errors import ConfigError
from sslcli.method import Method
from sslcli.nn import schedules


@dataclass(frozen=True)
class Schedule:
    """Where a run's steps lead and the lr / wd at each of them."""

    config: ScheduleConfig
    steps_per_epoch: int
    total_steps: int
    """The schedule horizon: ``trainer.epochs * steps_per_epoch``."""
    stop_step: int
    """Where the loop stops (``trainer.max_steps`` when it is sooner)."""
    warmup_steps: int
    base_lr: float
    """The optimiser's lr after batch scaling: the lr at factor 1."""

    @classmethod
    def of_run(
        cls,
        run: RunConfig,
        method_cls: type[Method],
        steps_per_epoch: int,
        base_lr: float,
        say: Callable[[str], None],
    ) -> Schedule:
        t = run.trainer
        total = t.epochs * steps_per_epoch
        warmup = warmup_steps(run, method_cls, steps_per_epoch, total, say)
        stop = min(total, t.max_steps or total)
        return cls(run.schedule, steps_per_epoch, total, stop, warmup, base_lr)

    def milestone_epochs(self) -> list[float]:
        """``schedule.milestones`` in epochs: a fraction m < 1 of the run becomes the epoch
        of step round(m * total_steps), so it falls on a whole step."""
        spe = self.steps_per_epoch
        return [
            m if m >= 1 else round(m * self.total_steps) / spe for m in self.config.milestones
        ]

    def lr_factor(self, step: int) -> float:
        """The lr of ``step`` relative to :attr:`base_lr`."""
        s = self.config
        if s.kind == "cosine":
            return schedules.warmup_cosine(
                step, self.total_steps, self.warmup_steps, s.final_lr_fraction
            )
        if s.kind == "step":
            return schedules.warmup_step(
                step, self.steps_per_epoch, self.warmup_steps, self.milestone_epochs(),
                s.gamma, s.milestone_factors,
            )  # fmt: skip
        return schedules.warmup_constant(step, self.warmup_steps)

    def apply(self, optimizer: Optimizer, step: int) -> float:
        """Set every parameter group's lr (and weight decay, with
        ``schedule.weight_decay_end``) for ``step``; returns the lr at factor 1's scale."""
        f = self.lr_factor(step)
        wd_end = self.config.weight_decay_end
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * f
            if wd_end is not None and g["base_wd"] > 0:
                g["weight_decay"] = schedules.cosine_between(
                    step, self.total_steps, g["base_wd"], wd_end
                )
        return self.base_lr * f


def steps_per_epoch(dataset_size: int, batch_size: int) -> int:
    """Whole global batches per epoch (the rest of the permutation is dropped)."""
    steps = dataset_size // batch_size
    if steps == 0:
        raise ConfigError(
            [f"trainer.batch_size: {batch_size} is larger than the dataset "
             f"({dataset_size} images)"]
        )  # fmt: skip
    return steps


def warmup_steps(
    run: RunConfig,
    method_cls: type[Method],
    steps_per_epoch: int,
    total_steps: int,
    say: Callable[[str], None],
) -> int:
    """Warm-up length in steps.

    A warm-up the user states (``schedule.warmup_epochs`` from a recipe file, a flag or
    --set) is used as stated: an official recipe's warm-up (MoCo v3 ViT: 40 of 300
    epochs) is part of that recipe. Only the built-in default, the method's class
    recipe when nothing states a warm-up, is capped at 10 % of the run, so a short run
    is not all warm-up; the cap says so in one line when it shortens it.
    """
    s, spe = run.schedule, steps_per_epoch
    if s.warmup_epochs is not None:
        return int(round(s.warmup_epochs * spe))
    default = method_cls.recipe_for(run.backbone.name).schedule.get("warmup_epochs")
    steps = int(round((default or 0) * spe))
    cap = int(0.1 * total_steps)
    if steps > cap:
        say(
            f"warm-up: {method_cls.name}'s default {default:g} epochs is more than "
            f"10% of this {run.trainer.epochs}-epoch run; using {cap} steps "
            f"({cap / spe:.3g} epochs). Set schedule.warmup_epochs to keep a longer one."
        )
        return cap
    return steps
