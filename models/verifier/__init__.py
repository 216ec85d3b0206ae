"""The absent-sound verifier as a model, used alike by the verifier deployment (serving/) and its training (train/):

- :mod:`models.verifier.text` — the frozen text encoder (all-MiniLM-L6-v2) and matching phrases to ontology classes;
- :mod:`models.verifier.scorer` — the audio sides whose frames live in the text encoder's space (log-mel CNN,
  heads on a frozen Whisper or YAMNet);
- :mod:`models.verifier.verifiers` — verifiers behind one interface (embedded, fused, CLAP), calibrated;
- :mod:`models.verifier.checkpoint` — load and save (``load_verifier``, ``save_embedded``);
- :mod:`models.verifier.card` — the model card written next to the weights.
"""
