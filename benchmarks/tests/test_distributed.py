"""`make distributed`'s table: shared and serial stages apart, the ratio of the shared ones, and a
difference in bytes or numbers named, never reported as equal."""

from benchmarks.distributed import markdown


def _found(same_files: bool) -> dict:
    return {
        "recipe": "r.yaml",
        "nproc": 2,
        "one": {"exit": 0, "seconds": 50.0},
        "many": {"exit": 0, "seconds": 40.0},
        "same_files": same_files,
        "different_files": [] if same_files else ["engine/model.opt.onnx"],
        "same_numbers": True,
        "parallel": {"calibrate": (4.0, 2.0), "compare": (6.0, 3.0)},
        "serial": {"export": (9.0, 9.0)},
        "parallel_ratio": 0.5,
    }


def test_the_table_puts_each_stage_where_it_runs_and_names_a_difference():
    text = markdown(_found(True))
    assert "| calibrate | every rank | 4.0 | 2.0 | 0.50 |" in text and "| export | rank 0 | 9.0 | 9.0 | 1.00 |" in text
    assert "**byte-identical**" in text and "**0.50x**" in text
    different = markdown(_found(False))
    assert "**DIFFERENT** (engine/model.opt.onnx)" in different and "byte-identical" not in different
