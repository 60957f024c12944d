"""fastdpo: fused, memory-lean Direct Preference Optimization losses.

    out = fastdpo.loss(hidden=h, weight=lm_head.weight, ref_hidden=ref_h, labels=labels, beta=0.1)
    out.loss.backward()
"""
__version__ = "0.1.0"

from .dpo import DPOOutput, EmptySequenceWarning, loss
from .logps import SequenceLogps, sequence_logps
from .losses import LOSS_TYPES, preference_loss
from .model import model_loss
from .packing import PackedBatch, PairCollator, pack_pairs, pack_rows
from .ref_cache import ReferenceCache

__all__ = ["loss", "DPOOutput", "sequence_logps", "SequenceLogps", "preference_loss", "LOSS_TYPES",
           "model_loss", "pack_pairs", "PackedBatch", "ReferenceCache",
           "EmptySequenceWarning", "pack_rows", "PairCollator"]
