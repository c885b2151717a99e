"""The Space entry point: what a Hub Space runs as ``python app.py`` (docs/design.md, "Space").

``hub-msif push space`` uploads this very file as the Space's ``app.py``, next to a hub_msif wheel
(the import below comes from that wheel) and ``msif_space.json``, which names the factors and the
index the Space serves. The Space variables ``MSIF_FACTORS`` and ``MSIF_INDEX`` override that
file; ``MSIF_*`` limits, ``GRADIO_SERVER_NAME`` and ``GRADIO_SERVER_PORT`` are honoured (see
``hub_msif.apps.space.run.main``).
"""

from pathlib import Path

from hub_msif.apps.space.run import main

CONFIG = Path(__file__).resolve().with_name("msif_space.json")

if __name__ == "__main__":
    main(config=CONFIG)
