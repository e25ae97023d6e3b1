"""scripts/pretraining_dynamics.py: checkpoints during training and checkpoint discovery."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from specext.pipelines import demo_models
from specext.probes import synthetic
from script_module import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pretraining_dynamics.py"
TINY = dict(d_model=16, d_ff=32, n_layers=1, n_heads=2, batch_size=8, warmup=1)


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT, "pretraining_dynamics")


def test_checkpoint_step_names(script):
    assert script.checkpoint_step("step-00100") == 100
    assert script.checkpoint_step("stage1-step1000-tokens5B") == 1000
    assert script.checkpoint_step("Step_7") == 7
    assert script.checkpoint_step("final") is None


def test_find_checkpoints_orders_by_step(script, tmp_path):
    for name in ("stage1-step1000-tokens5B", "stage1-step200-tokens1B", "notes"):
        (tmp_path / name).mkdir()
    for name in ("stage1-step1000-tokens5B", "stage1-step200-tokens1B"):
        (tmp_path / name / "config.json").write_text("{}")
    got = script.find_checkpoints(tmp_path)
    assert [(s, d.name) for s, d in got] == [(200, "stage1-step200-tokens1B"), (1000, "stage1-step1000-tokens5B")]
    with pytest.raises(SystemExit, match="no checkpoint"):
        script.find_checkpoints(tmp_path / "notes")


def test_checkpoints_do_not_change_the_trajectory(tmp_path):
    world = synthetic.generate_world(0, concepts_per_category=4)
    demo_models.train_synthetic_model(world, tmp_path / "plain", steps=4, evaluate=False, progress=False, **TINY)
    demo_models.train_synthetic_model(world, tmp_path / "ck", steps=4, evaluate=False, progress=False,
                                      checkpoint_steps=(2, 4), checkpoint_dir=tmp_path / "steps", **TINY)
    final = load_file(str(tmp_path / "plain" / "model.safetensors"))
    last = load_file(str(tmp_path / "steps" / "step-00004" / "model.safetensors"))
    mid = load_file(str(tmp_path / "steps" / "step-00002" / "model.safetensors"))
    assert final.keys() == last.keys()
    assert all((final[k] == last[k]).all() for k in final)  # bit for bit
    assert any((final[k] != mid[k]).any() for k in final)
    with pytest.raises(ValueError, match="checkpoint_steps"):
        demo_models.train_synthetic_model(world, tmp_path / "bad", steps=4, evaluate=False, progress=False,
                                          checkpoint_steps=(5,), checkpoint_dir=tmp_path / "steps", **TINY)
