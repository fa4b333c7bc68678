"""`python -m services.inference`: one inference worker.

Reads InferenceConfig from the environment (the model catalog: INFERSWARM_MODELS
or INFERSWARM_MODELS_FILE, by default the local SmolLM2 model as "smollm2"),
joins the mesh, starts the backends, and serves `inference.*`, announced on
`inferswarm/model/<model>` for each model (but not while the model's circuit
breaker is open) and on `inferswarm/inference/v1`, with its load, until SIGTERM.
"""

from __future__ import annotations


from shared.config import load_or_exit
from shared.runner import run
from services.inference.config import InferenceConfig
from services.inference.worker import InferenceWorker


def main() -> None:
    config = load_or_exit(InferenceConfig, "inference")
    worker = InferenceWorker(config)
    run("inference", worker.build, config.mesh, topics=worker.topics, load=worker.load,
        topic_load=worker.topic_load, hidden=worker.hidden)


if __name__ == "__main__":
    main()
