"""The cloak's aim: what the margin and the verdict are measured against (``CloakSettings.aim``).

``self``: each recognizer's threshold on the similarity to the photo's own clean face. ``others``: the
threshold over the dev set's 95th percentile of same-person similarities (``dev.genuine_p95`` in the
manifest), the similarity below which the person's other photos stop matching. On the astronaut
(scikit-image) and the shipped ``mobileface``, so a fresh clone runs them; what the aim buys on the
colour set is measured in ``bench/RESULTS.md`` (run 31), not asserted here.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from conftest import LinearGraph
from PIL import Image

from uncnn_rt.runtime import catalog, cloak
from uncnn_rt.runtime.cloak.verify import verify
from uncnn_rt.runtime.errors import InputError
from uncnn_rt.runtime.imageio import LoadedImage
from uncnn_rt.runtime.sessions import AttackSession

NAME = "mobileface"


def test_the_aim_at_others_is_the_threshold_over_the_genuine_similarity(
    mobileface_alone: list[AttackSession], monkeypatch: pytest.MonkeyPatch
) -> None:
    (session,) = mobileface_alone
    threshold = session.info.threshold
    rho = catalog.get_model(NAME).genuine_p95
    assert threshold is not None and rho is not None and threshold < rho < 1
    assert cloak.aim_for(session, "self", targeted=False) == threshold
    assert cloak.aim_for(session, "others", targeted=False) == pytest.approx(threshold / rho)
    # A targeted cloak's reference is the target's embedding: it keeps the threshold.
    assert cloak.aim_for(session, "others", targeted=True) == threshold
    # A model without the figure (a user's attack graph), or one whose photos of a person come no closer
    # than its threshold, keeps the threshold too.
    monkeypatch.setattr(catalog, "genuine_similarity", lambda s: None)
    assert cloak.aim_for(session, "others", targeted=False) == threshold
    monkeypatch.setattr(catalog, "genuine_similarity", lambda s: threshold)
    assert cloak.aim_for(session, "others", targeted=False) == threshold
    with pytest.raises(InputError, match="aim must be one of"):
        cloak.aim_for(session, "nobody", targeted=False)
    with pytest.raises(InputError, match="aim must be one of"):
        cloak.settings_for("mid", aim="nobody")


def test_a_user_model_has_no_genuine_figure(linear_face_graph: LinearGraph) -> None:
    user = AttackSession(linear_face_graph.path, device="cpu")
    assert catalog.genuine_similarity(user) is None
    assert cloak.aim_for(user, "others", targeted=False) == user.info.threshold


def test_aiming_at_others_stops_sooner_with_less_change_and_the_verdict_is_taken_there(
    mobileface_alone: list[AttackSession], astronaut_photo: LoadedImage
) -> None:
    detector = cloak.load_detector()
    (session,) = mobileface_alone
    threshold = session.info.threshold
    assert threshold is not None
    results = {}
    for aim in ("self", "others"):
        settings = replace(cloak.MODES["mid"], aim=aim)
        result = cloak.cloak_image(
            astronaut_photo, recognizers=mobileface_alone, detector=detector, mode=settings, seed=1
        )
        buffer = io.BytesIO()
        Image.fromarray(result.image).save(buffer, format="PNG")
        report = verify(
            astronaut_photo, buffer.getvalue(), result, recognizers=mobileface_alone, detector=detector
        )
        (face,) = report.faces
        (check,) = face.models
        results[aim] = (result, check)
    aim = cloak.aim_for(session, "others", targeted=False)
    assert aim is not None
    for name, want in (("self", threshold), ("others", aim)):
        result, check = results[name]
        assert check.aim == pytest.approx(want) and check.threshold == threshold
        assert check.protected == (check.after < want)
        assert result.faces[0].outcomes[0].threshold == pytest.approx(want)
    (mine, check), (theirs, strict) = results["others"], results["self"]
    assert check.protected and strict.protected
    # The looser aim is reached at a higher similarity, with a smaller change of the face.
    assert check.after > strict.after + 0.1
    spent = [np.abs(r.image.astype(np.int16) - astronaut_photo.rgb).sum() for r in (mine, theirs)]
    assert spent[0] < spent[1]
    mine_flip, theirs_flip = (r.faces[0].visibility.flip for r in (mine, theirs))  # type: ignore[union-attr]
    assert mine_flip < theirs_flip
