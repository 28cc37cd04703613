"""The instant fake provider as an importable ASGI app, for uvicorn in the gateway benchmark."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fake_upstream import FakeUpstream  # noqa: E402

app = FakeUpstream()
