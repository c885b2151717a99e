"""Factor, index and gradient index artifacts on the Hugging Face Hub: push, pull, find (docs/design.md,
"Hub artifacts"), and a Space that serves them (``push_space``, docs/design.md, "Space").

All three artifacts are dataset repos; everything goes through ``huggingface_hub`` and so honours
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``. ``hub_msif.hub.server``
is a Hub-compatible server for offline work and tests.
"""

from hub_msif.hub.find import find_factors, model_ref, same_model
from hub_msif.hub.location import Location, parse_location
from hub_msif.hub.pull import pull_factors, pull_gradindex, pull_index
from hub_msif.hub.push import Pushed, push_factors, push_gradindex, push_index
from hub_msif.hub.space_push import SpacePushed, push_space

__all__ = ["Location", "Pushed", "find_factors", "model_ref", "parse_location", "pull_factors", "pull_gradindex",
           "pull_index", "push_factors", "push_gradindex", "push_index", "push_space", "same_model", "SpacePushed"]
