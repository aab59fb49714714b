"""The medium preset: the paper's network with fewer steps, for addmul and scan only, exclusive with --quick."""

import pytest

from modscope.errors import InvalidParameterError
from modscope.experiments import addmul, scan, stability
from modscope.experiments.common import ExperimentOptions, preset_label, resolve_settings


@pytest.mark.parametrize("experiment", [addmul, scan])
def test_medium_keeps_the_papers_network_and_cuts_steps(experiment):
    settings = resolve_settings(experiment.SETTINGS, experiment.QUICK, ExperimentOptions(medium=True),
                                medium=experiment.MEDIUM)
    network = "hidden"
    assert settings[network] == experiment.SETTINGS[network]
    assert settings["mask_steps"] < experiment.SETTINGS["mask_steps"]
    assert "mask_steps" in settings.describe()


def test_medium_is_refused_where_there_is_none_and_with_quick():
    with pytest.raises(InvalidParameterError, match="no medium preset"):
        resolve_settings(stability.SETTINGS, stability.QUICK, ExperimentOptions(medium=True))
    with pytest.raises(InvalidParameterError, match="not both"):
        resolve_settings(addmul.SETTINGS, addmul.QUICK, ExperimentOptions(quick=True, medium=True), medium=addmul.MEDIUM)


def test_reports_name_the_preset():
    assert preset_label(ExperimentOptions(medium=True)) == "medium preset"
    assert preset_label(ExperimentOptions(quick=True)) == "quick preset"
    assert preset_label(ExperimentOptions()) == "full run"
