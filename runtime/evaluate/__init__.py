"""The evaluation protocol of ``uncnn-rt eval``: how protection is measured.

**Dataset.** One folder per identity, at least 2 photos each. Every clean photo is embedded by every
evaluator (a face recognizer with a match threshold); the clean embeddings form the gallery.

**Recognized.** A probe is recognized when its nearest *other* gallery photo (cosine similarity) is of
the same identity and the similarity is at least the evaluator's threshold. Only probes that are
recognized when clean are *eligible*: protection is counted over them and nothing else.

**P1, probe cloaked** (the LinkedIn case): the cloaked photo ``i`` is searched against every clean
photo except the clean original of ``i``. Protection = share of eligible probes no longer recognized.

**P2, gallery cloaked** (the scraping case): the clean photo ``i`` is searched against a gallery in
which the *other photos of i's identity are their cloaked versions* and everyone else's photos are
clean (the person cloaked every photo they uploaded; nobody else did). Protection = share of eligible
probes no longer recognized. P2 needs every photo of an identity cloaked, so ``limit`` takes whole
identities; the photos of the other identities stay in the gallery, clean.

**Conditions.** The cloaked photo is first encoded as ``uncnn-rt cloak`` would save it (the input's
format; lossless for PNG, quality 95 4:4:4 for JPEG) and decoded: *as saved*. Then, as upload
platforms do, *JPEG q75* (Pillow, default 4:2:0 chroma) of the saved pixels, and a *downscale* of the
saved pixels by 50% and back up to the photo's size (Pillow bilinear both ways, antialiased going
down). Each transformed photo is embedded afresh through the same face pipeline as the clean photos
(whole image for aligned chips; re-detection and re-alignment otherwise). Only the cloaked photos are
transformed; the clean gallery is left as it is. The *control* figures apply the same transform to
the uncloaked photo, so protection that the transform alone would cause is visible.

A cloaked face the detector no longer finds cannot be matched: as a P1 probe it counts as protected,
as a P2 gallery photo it is missing; ``lost`` counts these faces.

**Attacks and evaluators.** *White-box*: photos cloaked with the whole ensemble, scored on each member.
*Leave-one-out*: for each member ``m``, photos cloaked with the ensemble without ``m``, scored on ``m``.
*External*: every other evaluator (shipped recognizers outside the ensemble, a user's ONNX model),
scored on the white-box cloaks, i.e. on what a user of the ensemble actually publishes. An external
model that is the same network as an ensemble member (``duplicate_of``) is flagged: it is not an
independent check.

**Group photos** have no identity labels; their report is *self-protection*: per detected face, the
cloaked face's similarity to the same face's clean embedding, protected when below the threshold.

Everything here is injectable: the cloak function, the embedders and the face finder, so the protocol
can be tested on synthetic data where the answer is known.

The modules, each importing only those above it: :mod:`.dataset` (labelled photos), :mod:`.embedders`
(face finders and recognizers), :mod:`.protocol` (conditions, and P1/P2/P3 on embeddings),
:mod:`.report` (scores and their JSON form), :mod:`.cloaks` (cloak functions, the plan of attacks),
:mod:`.run` (the evaluation loop and group photos) and :mod:`.plots` (the report's figures).
"""

from __future__ import annotations

from uncnn_rt.runtime.evaluate.cloaks import (
    Attack,
    Cloaked,
    CloakFunction,
    cloak_function,
    plan_attacks,
)
from uncnn_rt.runtime.evaluate.dataset import (
    Dataset,
    Photo,
    group_photos_folder,
    identities_folder,
    image_files,
    load_dataset,
    load_group_photos,
    probe_indices,
)
from uncnn_rt.runtime.evaluate.embedders import (
    WINDOWS,
    Embedder,
    FaceFinder,
    FaceView,
    OnnxEmbedder,
    OnnxPreprocessing,
    SessionEmbedder,
    detected_faces,
    main_face,
    open_evaluator,
    shipped_embedders,
    whole_image_faces,
)
from uncnn_rt.runtime.evaluate.protocol import (
    AS_SAVED,
    PROTOCOL_TEXT,
    PROTOCOLS,
    SCORE_KINDS,
    WHITE_BOX_LABEL,
    Condition,
    Kind,
    PhotoTransform,
    ProtocolOutcome,
    Rate,
    as_saved_condition,
    default_conditions,
    downscale_condition,
    jpeg_condition,
    recognized,
    run_protocols,
    saved_pixels,
)
from uncnn_rt.runtime.evaluate.report import (
    SCHEMA,
    AttackQuality,
    ConditionScore,
    EvalReport,
    EvaluatorInfo,
    GroupEvaluatorScore,
    GroupReport,
    GroupScore,
    ModeReport,
    Sample,
    Score,
    pooled,
    summarise_visibility,
)
from uncnn_rt.runtime.evaluate.run import (
    ProgressFn,
    evaluate,
    evaluate_group_photos,
    face_figures,
    ladder_figures,
)

__all__ = [
    "AS_SAVED",
    "PROTOCOLS",
    "PROTOCOL_TEXT",
    "SCHEMA",
    "SCORE_KINDS",
    "WHITE_BOX_LABEL",
    "WINDOWS",
    "Attack",
    "AttackQuality",
    "CloakFunction",
    "Cloaked",
    "Condition",
    "ConditionScore",
    "Dataset",
    "Embedder",
    "EvalReport",
    "EvaluatorInfo",
    "FaceFinder",
    "FaceView",
    "GroupEvaluatorScore",
    "GroupReport",
    "GroupScore",
    "Kind",
    "ModeReport",
    "OnnxEmbedder",
    "OnnxPreprocessing",
    "Photo",
    "PhotoTransform",
    "ProgressFn",
    "ProtocolOutcome",
    "Rate",
    "Sample",
    "Score",
    "SessionEmbedder",
    "as_saved_condition",
    "cloak_function",
    "default_conditions",
    "detected_faces",
    "downscale_condition",
    "evaluate",
    "evaluate_group_photos",
    "face_figures",
    "group_photos_folder",
    "identities_folder",
    "image_files",
    "jpeg_condition",
    "ladder_figures",
    "load_dataset",
    "load_group_photos",
    "main_face",
    "open_evaluator",
    "plan_attacks",
    "pooled",
    "probe_indices",
    "recognized",
    "run_protocols",
    "saved_pixels",
    "shipped_embedders",
    "summarise_visibility",
    "whole_image_faces",
]
