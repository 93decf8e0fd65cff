"""The model card's words come from the figures they describe."""

from training.card import study_note


def test_the_study_note_states_the_measured_gaps():
    study = {
        "upscaled_48/ours": 0.90,
        "upscaled_48/bicubic": 0.895,
        "upscaled_48/nearest_squash": 0.90,
        "upscaled_97/ours": 0.89,
        "upscaled_97/bicubic": 0.888,
        "upscaled_97/nearest_squash": 0.896,
        "wide_4x3/ours": 0.90,
        "wide_4x3/bicubic": 0.897,
        "wide_4x3/nearest_squash": 0.878,
    }
    note = study_note(study)
    assert "gains +0.2 to +0.5 points" in note  # box vs bicubic over all variants
    assert "square upscales: -0.6 to +0.0 points" in note  # only the square ones
    assert "distorts: +2.2 points" in note  # the wide frame
