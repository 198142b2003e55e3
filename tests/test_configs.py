"""Every named method has an example config in configs/, and every example config plans cleanly."""

import glob
import os

import yaml

import jmerge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_every_method_has_an_example_config():
    used = {yaml.safe_load(open(f))["merge_method"] for f in CONFIGS}
    assert set(jmerge.available_methods()) - used == set()


def test_example_configs_plan(tmp_path):
    """All configs through one process: `jmerge merge --dry-run` parses, resolves models and plans."""
    from jmerge.cli import main
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for f in CONFIGS:
            assert main(["merge", f, str(tmp_path / "out"), "--dry-run", "--quiet"]) in (0, None), f
            assert not (tmp_path / "out").exists()
    finally:
        os.chdir(cwd)
