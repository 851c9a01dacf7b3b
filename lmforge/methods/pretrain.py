"""Causal-LM pretraining: every token of every text carries loss; long documents are split, not truncated.

The loss, packing, checkpoints and outputs are SFT's (``methods/sft.py``): pretraining is the case where no
token is masked. What differs lives in the data layer (``METHOD_FORMATS`` and splitting in ``prepare.py``)
and in model set-up (``model.config`` + ``model.train_tokenizer`` build a model from scratch).
"""

from lmforge.config import Config
from lmforge.methods import sft


def train(cfg: Config):
    return sft.train(cfg)
