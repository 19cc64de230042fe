"""The report's speed section: predicted against measured, and the warning when the machine ran
at another speed than when its cost profile was measured."""

from puzzlenas.report import speed_section
from puzzlenas.workdir import SolutionRecord

LAYERS = (("layer000.attention.gqa2", "layer000.ffn.mlp8"),)


def record(speedup: float, total_s: float) -> SolutionRecord:
    predicted = {"prefill_s": total_s / 4, "decode_step_s": total_s / 40, "total_s": total_s}
    return SolutionRecord(0, 0.1, speedup, predicted, 1, 1, LAYERS)


def results(parent_s: float, child_s: float) -> dict:
    def speed(total_s):
        return {"total_s": total_s, "total_speedup": parent_s / total_s}

    return {"engine": "llama.cpp", "reference": "parent",
            "models": {"parent": {"speed": speed(parent_s)}, "child": {"speed": speed(child_s)}}}


def test_speed_section_compares_each_model_and_the_parent_with_the_profile():
    # the profile predicts the parent at 1.5 x 0.8 = 1.2 s; the eval measured 1.18 s: no warning
    lines = speed_section({"child": record(1.5, 0.8), "width baseline": None}, results(1.18, 0.79))
    text = "\n".join(lines)
    assert "| parent | 1.00x | 1.00x | 1.200 | 1.180 |" in text
    assert "| child | 1.50x | 1.49x | 0.800 | 0.790 |" in text
    assert "width baseline" not in text and "profiled it" not in text


def test_speed_section_warns_when_the_parent_ran_faster_than_profiled():
    lines = speed_section({"child": record(1.5, 0.8)}, results(0.72, 0.40))
    warning = [line for line in lines if "profiled it" in line]
    assert len(warning) == 1 and "0.720 s per scenario here against 1.200 s" in warning[0] and "(0.60x)" in warning[0]
    assert "--from costs" in warning[0]
    # a roofline's seconds are an estimate, not a measurement of this machine: nothing to compare
    estimated = speed_section({"child": record(1.5, 0.8)}, results(0.72, 0.40), estimated=True)
    assert not [line for line in estimated if "profiled it" in line]
