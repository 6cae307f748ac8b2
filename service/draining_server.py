"""uvicorn's server whose first SIGTERM/SIGINT also starts the app's drain (used by ``serve``)."""

from __future__ import annotations

from types import FrameType

import uvicorn

from service.app import ServiceState


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT also starts the app's drain."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; a drained exit is a clean 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
