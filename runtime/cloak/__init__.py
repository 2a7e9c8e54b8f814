"""Cloak the faces of a photo, and check the cloak as a tracker would see it.

========================  ==========================================================================
module                    what lives there
========================  ==========================================================================
:mod:`.modes`             the budget and recipe of one cloak, and the ``low`` / ``mid`` / ``high`` modes
:mod:`.regions`           a face's region of the photo, its crop map, and the mask of its budget
:mod:`.caps`              the visibility cap of a face, held in the loop and on the saved file
:mod:`.photo`             :func:`cloak_image`: every face of a photo through one batched attack
:mod:`.verify`            re-detect and re-embed the saved file; compare and classify photos
========================  ==========================================================================

Faces themselves (detection, sites, embeddings, re-matching) are :mod:`uncnn_rt.runtime.geometry.faces`;
the recognizers a cloak runs against are resolved by :mod:`uncnn_rt.runtime.catalog`.
"""

from uncnn_rt.runtime.catalog import default_recognizer_names, load_recognizers
from uncnn_rt.runtime.cloak.caps import ENCODER_SHARE, FaceLimits, exceeds, face_limits
from uncnn_rt.runtime.cloak.modes import (
    AIMS,
    DEFAULT_MODE,
    MODES,
    SEED_LIMIT,
    CloakSettings,
    check_seed,
    parse_cap,
    settings_for,
)
from uncnn_rt.runtime.cloak.photo import (
    BATCH_FACES,
    CloakedFace,
    CloakProgress,
    CloakProgressCallback,
    CloakResult,
    ModelOutcome,
    aim_for,
    cloak_image,
    far_directions,
    photo_rng,
    scatter_directions,
    scatter_rng,
    target_embeddings,
)
from uncnn_rt.runtime.geometry.faces import Detector, NoFaceError, TooManyFacesError, load_detector

__all__ = [
    "AIMS",
    "BATCH_FACES",
    "DEFAULT_MODE",
    "ENCODER_SHARE",
    "MODES",
    "SEED_LIMIT",
    "CloakProgress",
    "CloakProgressCallback",
    "CloakResult",
    "CloakSettings",
    "CloakedFace",
    "Detector",
    "FaceLimits",
    "ModelOutcome",
    "NoFaceError",
    "TooManyFacesError",
    "aim_for",
    "check_seed",
    "cloak_image",
    "default_recognizer_names",
    "exceeds",
    "face_limits",
    "far_directions",
    "load_detector",
    "load_recognizers",
    "parse_cap",
    "photo_rng",
    "scatter_directions",
    "scatter_rng",
    "settings_for",
    "target_embeddings",
]
