"""The FGSM/PGD family on onnxruntime, sharing one gradient loop.

Typical use::

    from uncnn_rt.runtime.sessions import open_session
    from uncnn_rt.runtime.attacks import PGD, Victim, InputDiversity, TranslationInvariance

    model = open_session("faceres.onnx", device="auto")
    clean = model.features(faces_at_model_size)                     # [N, D] unit embeddings
    result = PGD(eps=8, steps=40, diversity=InputDiversity(), smoothing=TranslationInvariance())(
        faces, [Victim(model, clean)], quantize=True, seed=0
    )
    result.images, result.success["faceres"], result.history["faceres"]
"""

from uncnn_rt.runtime.attacks.apgd import APGD
from uncnn_rt.runtime.attacks.base import AttackResult, BoundCap, GradientAttack, PerImageCap, VisibilityCap
from uncnn_rt.runtime.attacks.boosters import (
    EOT,
    Blur,
    Downscale,
    InputDiversity,
    Jpeg,
    Transform,
    TranslationInvariance,
)
from uncnn_rt.runtime.attacks.criteria import (
    AllOf,
    AnyOf,
    Criterion,
    Misclassified,
    ModelState,
    PastThresholds,
    SimilarityAbove,
    SimilarityBelow,
    TargetReached,
    default_criterion,
)
from uncnn_rt.runtime.attacks.ensemble import Ensemble, Gradient, Victim
from uncnn_rt.runtime.attacks.fab import FAB
from uncnn_rt.runtime.attacks.linear import (
    Chain,
    Grey,
    LinearMap,
    Mirror,
    PerImage,
    Resize,
    ResizePad,
    Smooth,
    Upsample,
    resize_matrix,
)
from uncnn_rt.runtime.attacks.pgd import BIM, FGSM, IFGSM, L2PGD, MIFGM, MIFGSM, PGD, LinfPGD
from uncnn_rt.runtime.attacks.square import Square

__all__ = [
    "APGD",
    "BIM",
    "EOT",
    "FAB",
    "FGSM",
    "IFGSM",
    "L2PGD",
    "MIFGM",
    "MIFGSM",
    "PGD",
    "AllOf",
    "AnyOf",
    "AttackResult",
    "Blur",
    "BoundCap",
    "Chain",
    "Criterion",
    "Downscale",
    "Ensemble",
    "Gradient",
    "GradientAttack",
    "Grey",
    "InputDiversity",
    "Jpeg",
    "LinearMap",
    "LinfPGD",
    "Mirror",
    "Misclassified",
    "ModelState",
    "PastThresholds",
    "PerImage",
    "PerImageCap",
    "Resize",
    "ResizePad",
    "SimilarityAbove",
    "SimilarityBelow",
    "Smooth",
    "Square",
    "TargetReached",
    "Transform",
    "TranslationInvariance",
    "Upsample",
    "Victim",
    "VisibilityCap",
    "default_criterion",
    "resize_matrix",
]
