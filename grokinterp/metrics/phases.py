"""Phase boundaries of the transition, read off the metrics log of a run."""

from dataclasses import dataclass

from grokinterp.checkpoints import first_step_reaching


@dataclass(frozen=True)
class Phases:
    """First logged steps where train/validation accuracy pass 50% and 99% (None if never)."""

    train_50: int | None
    train_99: int | None
    val_50: int | None
    val_99: int | None
    last_step: int

    @property
    def grokking_delay(self) -> int | None:
        """Steps between fitting the training set (99%) and generalizing (99% validation)."""
        if self.train_99 is None or self.val_99 is None:
            return None
        return self.val_99 - self.train_99

    def spans(self) -> list[tuple[str, int, int]]:
        """Named intervals for shading figures: memorization (to train 99%), plateau (train fit, val < 50%),
        transition (val 50% -> 99%), generalized (after val 99%)."""
        bounds = [("memorization", 0, self.train_99), ("plateau", self.train_99, self.val_50),
                  ("transition", self.val_50, self.val_99), ("generalized", self.val_99, self.last_step)]
        out = []
        for name, start, end in bounds:
            if start is None:
                break
            end = self.last_step if end is None else end
            if end > start:
                out.append((name, start, end))
            if end == self.last_step:
                break
        return out

    def as_row(self) -> dict[str, int | None]:
        return {"train_50": self.train_50, "train_99": self.train_99, "val_50": self.val_50, "val_99": self.val_99,
                "grokking_delay": self.grokking_delay, "last_step": self.last_step}


def phases_from_log(rows: list[dict]) -> Phases:
    """Phases of a metrics log (rows with step, train_acc, val_acc)."""
    return Phases(
        train_50=first_step_reaching(rows, "train_acc", 0.5),
        train_99=first_step_reaching(rows, "train_acc", 0.99),
        val_50=first_step_reaching(rows, "val_acc", 0.5),
        val_99=first_step_reaching(rows, "val_acc", 0.99),
        last_step=int(rows[-1]["step"]) if rows else 0,
    )
