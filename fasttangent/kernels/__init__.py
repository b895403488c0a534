"""Compute ops behind the public API, one file per op (Liger-Kernel style).

Each op file holds the Triton kernel, its host wrapper, a torch reference and the
public function that dispatches on ``backend=`` (see ``fasttangent.backends``).
"""
from .gram import gram
from .factored_dense_gram import factored_dense_gram
from .factored_conv_gram import factored_conv_gram
from .sign_mask import pack_signs, count_sign_matches
from .alignment import alignment_terms, representation_alignment_terms

__all__ = [
    "gram",
    "factored_dense_gram",
    "factored_conv_gram",
    "pack_signs",
    "count_sign_matches",
    "alignment_terms",
    "representation_alignment_terms",
]
