"""peftlab's test suite.

The suite runs without a hub, as CI does: Hub models and datasets come from caches the tests build. huggingface_hub
reads ``HF_HUB_OFFLINE`` when it is first imported, so it is set here, before any test module imports it; a test
that wants the variable unset or the hub reachable runs its command in a subprocess with its own environment.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
