"""Early stopping shared by the screeners: keep the best epoch's weights, stop when stale."""

from __future__ import annotations

import copy
import logging
import math

from torch import nn

from cryosift.errors import CryosiftError

log = logging.getLogger("cryosift")


class EarlyStopping:
    """Track a validation score per epoch (lower is better); hold the best weights."""

    def __init__(self, name: str, patience: int) -> None:
        self.name, self.patience = name, patience
        self.history: list[dict[str, float]] = []
        self.best_loss, self.best_epoch, self.stale = math.inf, -1, 0
        self.best_state: dict | None = None

    def update(self, net: nn.Module, epoch: int, score: float, record: dict) -> bool:
        """Record an epoch; True when training should stop (no improvement for `patience`)."""
        if not math.isfinite(score):
            raise CryosiftError(
                f"{self.name} training diverged at epoch {epoch + 1} (try a smaller --lr)"
            )
        self.history.append(record)
        log.debug("%s epoch %d: %s", self.name.lower(), epoch + 1, record)
        if score < self.best_loss - 1e-5:
            self.best_loss, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = copy.deepcopy(net.state_dict())
            return False
        self.stale += 1
        return self.stale >= self.patience

    def finish(self, net: nn.Module) -> tuple[nn.Module, dict]:
        """The network with the best epoch's weights, in eval mode, and the training summary."""
        assert self.best_state is not None
        net.load_state_dict(self.best_state)
        net.eval()
        return net, {"history": self.history, "best_epoch": self.best_epoch,
                     "best_loss": self.best_loss}
