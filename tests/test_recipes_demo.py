"""`qwenvl-data demo` / `build_demo` without the packages of the `demo` extra."""

from __future__ import annotations

import pytest

import data_recipes.demo.assets as assets
from data_recipes.demo import build_demo


def test_demo_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    real = assets.find_spec
    hidden = {"skimage", "sklearn", "matplotlib", "easy_vqa"}
    monkeypatch.setattr(assets, "find_spec", lambda n: None if n in hidden else real(n))
    with pytest.raises(ModuleNotFoundError) as e:
        build_demo(tmp_path / "demo", small=True)
    msg = str(e.value)
    assert "pip install 'qwenvl-train[demo]'" in msg
    assert all(p in msg for p in ("scikit-image", "scikit-learn", "matplotlib", "easy-vqa"))
    assert not (tmp_path / "demo").exists()  # refused before anything is written
