"""What concurrent requests share in a replica gives each its own result: a tower's recorded layers belong to the
forward that computed them, however many run at once, and the verifier's text encoder embeds each caller's phrases.

The verifier replica scores up to ``verifier_max_ongoing`` clips in threads on one Whisper tower, and the
model server records its tower's layers inside ``generate``: both read them through
:func:`models.pretrained.whisper.captured_layers`. A tiny random tower (the Qwen2-Audio encoder class the
served models use) is run from many threads at once, each on its own input, and each thread's layers must
be the ones it gets alone, and the ones transformers' own ``output_hidden_states`` gives.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from models.pretrained.whisper import captured_layers, encode_layers


@pytest.fixture(scope="module")
def tower():
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig

    torch.manual_seed(0)
    config = Qwen2AudioEncoderConfig(num_mel_bins=16, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=64,
                                     d_model=32, max_source_positions=200)
    return Qwen2AudioEncoder(config).eval()


def _features(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, 400, generator=torch.Generator().manual_seed(seed))


def test_the_layers_are_transformers_own_hidden_states(tower):
    """last = the tower's output; middle = hidden state after layer len/2 - 1, through the tower's own pooler."""
    feats = _features(1)
    last, middle = encode_layers(tower, feats)
    with torch.no_grad():
        ref = tower(feats, output_hidden_states=True)
    half = len(tower.layers) // 2
    pooled = tower.avg_pooler(ref.hidden_states[half].permute(0, 2, 1)).permute(0, 2, 1)
    torch.testing.assert_close(last, ref.last_hidden_state)
    torch.testing.assert_close(middle, pooled)


def test_concurrent_forwards_each_record_their_own_layers(tower):
    seeds = list(range(16))
    alone = {s: encode_layers(tower, _features(s)) for s in seeds}
    assert not torch.equal(alone[0][0], alone[1][0])  # different inputs, different layers
    start = threading.Barrier(8)

    def together(seed: int):
        start.wait() if seed < 8 else None  # the first eight enter the tower at the same moment
        return seed, encode_layers(tower, _features(seed))

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            for seed, (last, middle) in pool.map(together, seeds):
                assert torch.equal(last, alone[seed][0]), f"clip {seed} got another forward's last layer"
                assert torch.equal(middle, alone[seed][1]), f"clip {seed} got another forward's middle layer"


def test_a_forward_outside_the_block_records_nothing(tower):
    """Another thread's forward while a block is open does not fill it: the block records its own forward only."""
    feats, other = _features(3), _features(4)
    done = threading.Event()
    with captured_layers(tower) as out:
        worker = threading.Thread(target=lambda: (tower(other), done.set()))
        worker.start()
        worker.join()
        assert done.is_set() and "layers" not in out
        with torch.no_grad():
            tower(feats)
    torch.testing.assert_close(out["layers"][0], encode_layers(tower, feats)[0])
    assert set(out) == {"layers"}


def test_the_text_encoder_embeds_each_threads_phrases():
    """The verifier's threads share one MiniLM encoder and its cache (kept small here, so it is cleared while others read)."""
    from models.verifier.text import TextEncoder

    encoder = TextEncoder(cache_size=4)
    texts = [[f"a sound of thing {i}", "a dog barking" if i % 2 else f"thing {i} {'far ' * i}"] for i in range(24)]
    alone = [encoder._embed(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: (i, encoder.encode(texts[i])), list(range(24)) * 3))
    for i, vectors in got:
        np.testing.assert_allclose(vectors, alone[i], atol=1e-5)
